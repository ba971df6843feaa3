"""The shared closed-form solvers against their explicit formulas, and their retain/zero-residual properties."""

from __future__ import annotations

import pytest
import torch

from erasure_core.errors import FitError
from erasure_core.metrics import relative_residual
from erasure_core.solver import (
    LowRankDelta,
    SymmetricSolver,
    compress_columns,
    normal_matrix,
    regularized_delta,
    zero_residual_delta,
)


def _problem(seed=0, *, d_out=12, d_in=10, n=3, n_keep=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    X = torch.randn(d_in, n, generator=g, dtype=dtype)
    Y = torch.randn(d_out, n, generator=g, dtype=dtype)
    Xk = torch.randn(d_in, n_keep, generator=g, dtype=dtype)
    return W, X, Y, Xk


# ----------------------------------------------------------------------------- regularized_delta
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_keep", [False, True])
def test_regularized_delta_equals_the_explicit_closed_form(seed, with_keep):
    W, X, Y, Xk = _problem(seed)
    lam = 0.3
    M = X @ X.T + lam * torch.eye(W.shape[1], dtype=torch.float64)
    if with_keep:
        M = M + Xk @ Xk.T
    explicit = (Y - W @ X) @ X.T @ torch.linalg.inv(M)
    delta = regularized_delta(W, X, Y, X_keep=Xk if with_keep else None, lam=lam)
    assert isinstance(delta, LowRankDelta) and delta.rank == X.shape[1]
    assert delta.A.shape == (12, 3) and delta.B.shape == (3, 10)
    torch.testing.assert_close(delta.dense(), explicit, rtol=1e-10, atol=1e-10)


def test_regularized_delta_is_the_argmin():
    """The gradient of the objective vanishes at ``W + Delta``."""
    W, X, Y, Xk = _problem(1)
    lam = 0.2
    D = regularized_delta(W, X, Y, X_keep=Xk, lam=lam).dense()
    Wn = W + D
    grad = (Wn @ X - Y) @ X.T + (Wn @ Xk - W @ Xk) @ Xk.T + lam * D
    assert grad.abs().max() < 1e-10


def test_regularized_delta_shared_solver_gives_the_same_result():
    W, X, Y, Xk = _problem(2)
    solver = SymmetricSolver(normal_matrix(X, Xk, 0.1))
    a = regularized_delta(W, X, Y, X_keep=Xk, lam=0.1).dense()
    b = regularized_delta(W, X, Y, X_keep=Xk, lam=0.1, solver=solver).dense()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_regularized_delta_preserves_heavily_weighted_retain_inputs():
    W, X, Y, Xk = _problem(3, n_keep=4)
    free = regularized_delta(W, X, Y, lam=1e-3).dense()
    kept = regularized_delta(W, X, Y, X_keep=100.0 * Xk, lam=1e-3).dense()
    moved_free = torch.linalg.norm(free @ Xk) / torch.linalg.norm(W @ Xk)
    moved_kept = torch.linalg.norm(kept @ Xk) / torch.linalg.norm(W @ Xk)
    assert moved_kept < 1e-3 and moved_kept < 0.01 * moved_free
    # the edit on the targets still happens (there is room: 3 targets + 4 retained < 10 dims)
    assert relative_residual(W, X, Y) > 1.0
    assert relative_residual(W + kept, X, Y) < 0.01


def test_regularized_delta_float32_close_to_float64():
    W, X, Y, Xk = _problem(4)
    d64 = regularized_delta(W, X, Y, X_keep=Xk).dense()
    d32 = regularized_delta(W.float(), X.float(), Y.float(), X_keep=Xk.float(), dtype=torch.float32)
    assert d32.A.dtype == torch.float32
    torch.testing.assert_close(d32.dense().double(), d64, rtol=1e-4, atol=1e-4)


def test_regularized_delta_rejects_bad_input():
    W, X, Y, _ = _problem(5)
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FitError, match="W contains NaN or infinite values"):
        regularized_delta(bad, X, Y)
    badx = X.clone()
    badx[1, 1] = float("inf")
    with pytest.raises(FitError, match="X contains NaN or infinite values"):
        regularized_delta(W, badx, Y)
    with pytest.raises(FitError, match="lam must be positive"):
        regularized_delta(W, X, Y, lam=0.0)


# ----------------------------------------------------------------------------- SymmetricSolver
def test_symmetric_solver_uses_cholesky_when_positive_definite():
    g = torch.Generator().manual_seed(6)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    M = A @ A.T + torch.eye(6, dtype=torch.float64)
    R = torch.randn(6, 2, generator=g, dtype=torch.float64)
    s = SymmetricSolver(M)
    assert s.L is not None
    torch.testing.assert_close(M @ s.solve(R), R, rtol=1e-10, atol=1e-10)


def test_symmetric_solver_falls_back_when_not_positive_definite():
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    M = Q @ torch.diag(torch.tensor([3.0, 2.0, 1.0, -0.5, -2.0], dtype=torch.float64)) @ Q.T  # indefinite
    R = torch.randn(5, 3, generator=g, dtype=torch.float64)
    s = SymmetricSolver(M)
    assert s.L is None  # Cholesky failed, LU is used
    torch.testing.assert_close(M @ s.solve(R), R, rtol=1e-10, atol=1e-10)


def test_symmetric_solver_rejects_nan():
    M = torch.eye(3)
    M[0, 1] = float("nan")
    with pytest.raises(FitError, match="normal matrix has NaN or infinite entries"):
        SymmetricSolver(M)


# ----------------------------------------------------------------------------- zero_residual_delta
@pytest.mark.parametrize("seed", range(3))
def test_zero_residual_float64_full_column_rank(seed):
    W, Xt, Y, Xr = _problem(seed, d_out=16, d_in=12, n=5, n_keep=8)
    delta, rep = zero_residual_delta(W, Xt, Y, X_r=Xr, lam=0.1)
    assert rep.kept == rep.columns == 5
    assert rep.kept_residual < 1e-10 and rep.total_residual < 1e-10
    assert rep.energy_outside == 0.0
    assert relative_residual(W + delta.dense(), Xt, Y) < 1e-10
    assert delta.A.shape == (16, 5) and delta.B.shape == (5, 12)


def test_zero_residual_float32_full_column_rank():
    W, Xt, Y, Xr = _problem(8, d_out=16, d_in=12, n=5, n_keep=8, dtype=torch.float32)
    delta, rep = zero_residual_delta(W, Xt, Y, X_r=Xr, lam=0.1, dtype=torch.float32)
    assert delta.A.dtype == torch.float32
    assert rep.kept == rep.columns == 5
    assert rep.kept_residual < 1e-4 and rep.total_residual < 1e-4


def test_zero_residual_matches_the_explicit_formula():
    W, Xt, Y, Xr = _problem(9, n=4)
    lam = 0.5
    delta, _ = zero_residual_delta(W, Xt, Y, X_r=Xr, lam=lam)
    Minv = torch.linalg.inv(Xr @ Xr.T + lam * torch.eye(Xt.shape[0], dtype=torch.float64))
    explicit = (Y - W @ Xt) @ torch.linalg.inv(Xt.T @ Minv @ Xt) @ Xt.T @ Minv
    torch.testing.assert_close(delta.dense(), explicit, rtol=1e-9, atol=1e-9)


def test_zero_residual_drops_dependent_columns():
    W, Xt, Y, Xr = _problem(10, d_out=16, d_in=12, n=4)
    g = torch.Generator().manual_seed(11)
    mix = torch.randn(4, 3, generator=g, dtype=torch.float64)
    Xt2 = torch.cat([Xt, Xt @ mix], 1)  # 7 columns of rank 4
    Y2 = torch.randn(16, 7, generator=g, dtype=torch.float64)
    delta, rep = zero_residual_delta(W, Xt2, Y2, X_r=Xr)
    assert rep.columns == 7 and rep.kept == 4
    assert rep.kept_residual < 1e-10  # exact on the kept subspace
    assert rep.total_residual > 1e-3  # inconsistent targets on dependent columns cannot all be met
    assert rep.energy_outside < 1e-12  # the dropped directions carry no energy
    assert delta.rank == 4


def test_zero_residual_more_columns_than_dims():
    W, Xt, Y, Xr = _problem(12, d_out=8, d_in=6, n=10)
    _, rep = zero_residual_delta(W, Xt, Y, X_r=Xr)
    assert rep.columns == 10 and rep.kept <= 6 and rep.kept < rep.columns
    assert rep.kept_residual < 1e-10
    assert rep.total_residual > 1e-3


def test_zero_residual_reports_energy_outside_for_near_dependent_columns():
    g = torch.Generator().manual_seed(13)
    W = torch.randn(8, 8, generator=g, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    Xt = U @ torch.diag(torch.tensor([10.0, 1.0, 1e-4], dtype=torch.float64)) @ V.T  # s3 < tol * s1
    Y = torch.randn(8, 3, generator=g, dtype=torch.float64)
    _, rep = zero_residual_delta(W, Xt, Y, tol=1e-3)
    assert rep.kept == 2 and rep.columns == 3
    expected = 1e-8 / (100.0 + 1.0 + 1e-8)
    assert rep.energy_outside == pytest.approx(expected, rel=1e-6)


def test_zero_residual_retain_moves_less_than_lam_only():
    W, Xt, Y, Xr = _problem(14, d_out=16, d_in=12, n=3, n_keep=6)
    d_plain, rep_plain = zero_residual_delta(W, Xt, Y, lam=0.1)
    d_kept, rep_kept = zero_residual_delta(W, Xt, Y, X_r=Xr, lam=0.1)
    assert rep_plain.kept_residual < 1e-10 and rep_kept.kept_residual < 1e-10  # both exact on the targets
    plain = torch.linalg.norm(d_plain.dense() @ Xr)
    kept = torch.linalg.norm(d_kept.dense() @ Xr)
    assert kept < 0.5 * plain


def test_zero_residual_rejects_nan_and_zero_targets():
    W, Xt, Y, _ = _problem(15)
    bad = W.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(FitError, match="W contains NaN or infinite values"):
        zero_residual_delta(bad, Xt, Y)
    with pytest.raises(FitError, match="target activations are all zero"):
        zero_residual_delta(W, torch.zeros_like(Xt), Y)
    with pytest.raises(FitError, match="lam must be positive"):
        zero_residual_delta(W, Xt, Y, lam=-1.0)


def test_compress_columns():
    g = torch.Generator().manual_seed(16)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64)
    Vk, outside = compress_columns(torch.cat([X, X], 1))
    assert Vk.shape == (6, 3) and outside < 1e-12
    torch.testing.assert_close(Vk.T @ Vk, torch.eye(3, dtype=torch.float64), rtol=1e-10, atol=1e-10)
