"""The shared closed-form solvers (METHODS.md, "The shared closed-form solver").

Regularised least squares (the UCE baseline)::

    W' = argmin sum_i ||W' x_i - y_i||^2 + sum_k ||W' x_k - W x_k||^2 + lam ||W' - W||_F^2
    Delta = (Y - W X) X^T M^{-1},   M = X X^T + X_k X_k^T + lam I

Zero-residual constrained solve (ErasePro)::

    min ||Delta X_r||^2 + lam ||Delta||^2   s.t.  (W + Delta) X_t = Y
    Delta = (Y - W X_t) (X_t^T M^{-1} X_t)^{-1} X_t^T M^{-1},   M = X_r X_r^T + lam I

Shapes: ``W``: ``(d_out, d_in)``; ``X``, ``X_t``: ``(d_in, n)`` (one column per token);
``Y``: ``(d_out, n)``; ``X_k``, ``X_r``: ``(d_in, n_r)``. Both deltas have rank at most
``n`` and are returned as factors ``A @ B`` (``A``: ``(d_out, k)``, ``B``: ``(k, d_in)``).
Everything is solved in float32 or float64 with Cholesky (``torch.linalg.solve`` as a
fallback), never an explicit inverse, on the device of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FitError

__all__ = [
    "LowRankDelta",
    "ResidualReport",
    "SymmetricSolver",
    "regularized_delta",
    "zero_residual_delta",
    "compress_columns",
]


@dataclass(frozen=True)
class LowRankDelta:
    """``Delta = A @ B`` with ``A``: ``(d_out, k)`` and ``B``: ``(k, d_in)``."""

    A: torch.Tensor
    B: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.A @ self.B

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def to(self, dtype: torch.dtype) -> LowRankDelta:
        return LowRankDelta(self.A.to(dtype), self.B.to(dtype))


@dataclass(frozen=True)
class ResidualReport:
    """Residuals of a zero-residual solve (ErasePro).

    ``kept_residual``: ``||W' X_t V_k - Y V_k|| / ||Y V_k||`` (zero up to rounding);
    ``total_residual``: ``||W' X_t - Y|| / ||Y||`` over all target tokens;
    ``energy_outside``: fraction of ``||X_t||_F^2`` outside the kept column subspace;
    ``kept``/``columns``: ``k`` and ``n``.
    """

    kept_residual: float
    total_residual: float
    energy_outside: float
    kept: int
    columns: int


class SymmetricSolver:
    """Solves ``M Z = R`` for a symmetric positive-definite ``M`` (``(d, d)``), factorised once.

    Cholesky first; if ``M`` is numerically indefinite, an LU solve is used instead.
    Reusing one factorisation for many right-hand sides is what makes a multi-layer
    closed form cheap when every layer reads the same inputs (PURE, UCE over layers).
    """

    def __init__(self, M: torch.Tensor) -> None:
        if not torch.isfinite(M).all():
            raise FitError("the normal matrix has NaN or infinite entries; check the captured activations and weights")
        self.M = M
        L, info = torch.linalg.cholesky_ex(M)
        self.L = L if int(info.max()) == 0 else None

    def solve(self, R: torch.Tensor) -> torch.Tensor:
        """``M^{-1} R`` for ``R``: ``(d, n)``."""
        if self.L is not None:
            return torch.cholesky_solve(R, self.L)
        return torch.linalg.solve(self.M, R)


def _check(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise FitError(f"{name} contains NaN or infinite values; the model weights or activations are broken")


def normal_matrix(X: torch.Tensor, X_keep: torch.Tensor | None, lam: float) -> torch.Tensor:
    """``M = X X^T + X_k X_k^T + lam I`` (``(d_in, d_in)``); ``X`` may have zero columns."""
    d = X.shape[0]
    M = X @ X.T
    if X_keep is not None and X_keep.numel():
        M = M + X_keep @ X_keep.T
    return M + lam * torch.eye(d, dtype=X.dtype, device=X.device)


def regularized_delta(
    W: torch.Tensor,
    X: torch.Tensor,
    Y: torch.Tensor,
    *,
    X_keep: torch.Tensor | None = None,
    lam: float = 0.1,
    dtype: torch.dtype = torch.float64,
    solver: SymmetricSolver | None = None,
) -> LowRankDelta:
    """UCE / regularised least squares: ``Delta = (Y - W X) X^T M^{-1}`` as factors.

    ``A = Y - W X`` (``(d_out, n)``), ``B = (M^{-1} X)^T`` (``(n, d_in)``; ``M`` is symmetric).
    Pass a ``solver`` built from ``normal_matrix(X, X_keep, lam)`` to share the
    factorisation across several weights that read the same ``X``.
    """
    if lam <= 0:
        raise FitError(f"lam must be positive, got {lam}")
    W, X, Y = (t.to(dtype) for t in (W, X, Y))
    Xk = X_keep.to(dtype) if X_keep is not None else None
    for name, t in (("W", W), ("X", X), ("Y", Y)):
        _check(name, t)
    if solver is None:
        solver = SymmetricSolver(normal_matrix(X, Xk, lam))
    A = Y - W @ X
    B = solver.solve(X).T
    return LowRankDelta(A, B)


def compress_columns(X: torch.Tensor, tol: float = 1e-3) -> tuple[torch.Tensor, float]:
    """Right singular vectors ``V_k`` (``(n, k)``) of ``X`` with ``s_i > tol * s_1``.

    Returns ``(V_k, energy_outside)``, the fraction of ``||X||_F^2`` outside ``X V_k``.
    """
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    if S.numel() == 0 or S[0] <= 0:
        raise FitError("the target activations are all zero; the target tokenises to nothing the model can see")
    keep = S > tol * S[0]
    total = (S**2).sum()
    outside = float(((S[~keep] ** 2).sum() / total).item()) if total > 0 else 0.0
    return Vh[keep].T, outside


def zero_residual_delta(
    W: torch.Tensor,
    X_t: torch.Tensor,
    Y: torch.Tensor,
    *,
    X_r: torch.Tensor | None = None,
    lam: float = 0.1,
    tol: float = 1e-3,
    dtype: torch.dtype = torch.float64,
    solver: SymmetricSolver | None = None,
) -> tuple[LowRankDelta, ResidualReport]:
    """The exact constrained solve ``(W + Delta) X_t V_k = Y V_k`` of minimal ``||Delta X_r||^2 + lam ||Delta||^2``.

    ``V_k`` keeps the right singular vectors of ``X_t`` above ``tol * s_1`` (near-dependent
    columns dropped first, METHODS.md). With ``Xc = X_t V_k``, ``Yc = Y V_k``, ``G = Xc^T M^{-1} Xc``::

        Delta = (Yc - W Xc) G^{-1} (M^{-1} Xc)^T        A = (Yc - W Xc) G^{-1},  B = (M^{-1} Xc)^T
    """
    if lam <= 0:
        raise FitError(f"lam must be positive, got {lam}")
    W, X_t, Y = (t.to(dtype) for t in (W, X_t, Y))
    for name, t in (("W", W), ("X_t", X_t), ("Y", Y)):
        _check(name, t)
    Vk, outside = compress_columns(X_t, tol)
    Xc, Yc = X_t @ Vk, Y @ Vk
    if solver is None:
        Xr = X_r.to(dtype) if X_r is not None else X_t.new_zeros(X_t.shape[0], 0)
        solver = SymmetricSolver(normal_matrix(Xr, None, lam))
    MinvX = solver.solve(Xc)
    G = Xc.T @ MinvX
    G = (G + G.T) / 2
    R = Yc - W @ Xc
    A = torch.linalg.solve(G, R.T).T
    delta = LowRankDelta(A, MinvX.T)
    B = delta.B

    def rel(X: torch.Tensor, target: torch.Tensor) -> float:
        out = W @ X + A @ (B @ X)
        return float((torch.linalg.norm(out - target) / torch.linalg.norm(target).clamp_min(1e-30)).item())

    kept, total = rel(Xc, Yc), rel(X_t, Y)
    _check("the solved delta", A)
    return delta, ResidualReport(kept, total, outside, Vk.shape[1], X_t.shape[1])
