"""PURE core: the projector's guarantee, streaming statistics, multi-target union, anchor, UCE."""

from __future__ import annotations

import pytest
import torch
from pure_helpers import fit_planted, planted

from erasure_core.errors import FitError
from erasure_core.pure import PureFitter, SecondMoment, SyntheticStack
from erasure_core.pure.uce import uce_fast, uce_reference

WIDTHS = (32, 64, 48)


@pytest.fixture(scope="module")
def stack():
    return SyntheticStack.build(WIDTHS, 64, seed=0)


def _edited(eraser, layer, W):
    up, down = eraser.delta(layer, W)
    return W + up @ down


def test_projector_kills_forget_directions_and_keeps_retain(stack):
    p = planted(targets=1)
    _, eraser = fit_planted(stack, p, rank=8)
    for layer in stack.layers:
        Q = eraser.bases[layer.name]
        assert 1 <= Q.shape[1] <= 8
        torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1]), atol=1e-5, rtol=0)
        # held-out reads: new queries, and retain prompts with new retain tokens
        R_f = torch.cat([stack.reads(p.prompt(i, 0), queries=32, seed=900 + i)[layer.name] for i in range(6)])
        R_r = torch.cat([stack.reads(p.prompt(i, None), queries=32, seed=950 + i)[layer.name] for i in range(6)])
        for W in (layer.W_k, layer.W_v):
            W2 = _edited(eraser, layer.name, W)
            along = R_f @ Q @ Q.T  # forget reads' component along the basis
            before = (along @ W.T).pow(2).sum()
            after = (along @ W2.T).pow(2).sum()
            assert after <= 0.01 * before
            # the planted concept directions themselves are gone from the K/V outputs
            G = p.vector(0)
            planted_part = R_f @ G @ G.T
            assert (planted_part @ W2.T).norm() <= 0.05 * (planted_part @ W.T).norm()
            change = ((R_r @ W2.T) - (R_r @ W.T)).norm() / (R_r @ W.T).norm()
            assert change < 0.01
        assert eraser.energy[layer.name] > 0


@pytest.mark.parametrize("cap", [0, 1000])  # dense and exact-factor accumulators
def test_streaming_equals_batch(cap):
    g = torch.Generator().manual_seed(1)
    R = torch.randn(300, 24, generator=g) @ torch.randn(24, 24, generator=g)
    whole = SecondMoment(24, cap=cap, dtype=torch.float64, device="cpu")
    whole.add(R)
    parts = SecondMoment(24, cap=cap, dtype=torch.float64, device="cpu")
    for chunk in R.split(37):
        parts.add(chunk)
    torch.testing.assert_close(parts.matrix(), R.double().T @ R.double())
    torch.testing.assert_close(whole.matrix(), parts.matrix())
    torch.testing.assert_close(parts.mean(), R.double().mean(0))
    assert parts.count == 300


def test_low_rank_reads_stay_factored_and_exact():
    g = torch.Generator().manual_seed(2)
    basis = torch.randn(5, 96, generator=g)
    m = SecondMoment(96, cap=48, dtype=torch.float64, device="cpu")
    full = torch.zeros(96, 96, dtype=torch.float64)
    for _ in range(20):
        R = torch.randn(100, 5, generator=g) @ basis
        m.add(R)
        full += R.double().T @ R.double()
    assert m.factor is not None and m.factor.shape[1] <= 2 * 48
    torch.testing.assert_close(m.matrix(), full)


def test_streaming_fit_equals_batch_fit(stack):
    p = planted(targets=1, seed=3)
    retain = [stack.reads(p.prompt(i % 6, None), queries=32, seed=100 + i) for i in range(36)]
    forget = [stack.reads(p.prompt(i, 0), queries=32, seed=200 + i) for i in range(6)]
    streaming, batch = PureFitter(stack.dims), PureFitter(stack.dims)
    for reads, forget_flag in [(r, False) for r in retain] + [(f, True) for f in forget]:
        for layer, R in reads.items():
            streaming.update(layer, R, forget=forget_flag)
    for layer in stack.dims:  # everything in one batch per layer
        batch.update(layer, torch.cat([r[layer] for r in retain]), forget=False)
        batch.update(layer, torch.cat([f[layer] for f in forget]), forget=True)
    for layer in stack.dims:
        torch.testing.assert_close(streaming.retain[layer].matrix(), batch.retain[layer].matrix(), atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(
            streaming.forget[0][layer].matrix(), batch.forget[0][layer].matrix(), atol=1e-3, rtol=1e-4
        )
    eraser_a, eraser_b = streaming.solve(), batch.solve()
    for layer in stack.dims:
        Qa, Qb = eraser_a.bases[layer], eraser_b.bases[layer]
        assert Qa.shape == Qb.shape
        torch.testing.assert_close(Qa @ Qa.T, Qb @ Qb.T, atol=1e-4, rtol=0)


def test_multi_target_union_is_orthonormal_and_covers_each_target(stack):
    p = planted(targets=3, seed=4)
    _, eraser = fit_planted(stack, p, targets=3, rank=4)
    for layer in stack.dims:
        Q = eraser.bases[layer]
        torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1]), atol=1e-5, rtol=0)
        for t in range(3):
            G = p.vector(t)
            assert torch.linalg.norm(G - Q @ (Q.T @ G)) <= 0.05 * torch.linalg.norm(G)
        assert 3 <= Q.shape[1] <= 12


def test_anchor_maps_mean_forget_read_to_mean_anchor_read(stack):
    p = planted(targets=1, seed=5)
    fitter, eraser = fit_planted(stack, p, anchor=True, rank=4)
    assert set(eraser.anchor_maps) == set(stack.dims)
    f_means = {layer: fitter._solved[0][layer][2] for layer in stack.dims}
    for layer in stack.layers:
        a = fitter.anchor[0][layer.name].mean()
        f = f_means[layer.name]
        up, down = eraser.delta(layer.name, layer.W_v)
        assert up.shape[1] == down.shape[0] == eraser.rank(layer.name)
        out = (layer.W_v + up @ down) @ f
        target = layer.W_v @ a
        assert torch.linalg.norm(out - target) <= 0.02 * torch.linalg.norm(target)


def test_hundred_targets_on_the_synthetic_stack():
    stack = SyntheticStack.build((32, 48), 384, seed=6)
    p = planted(d_c=384, shared=128, targets=100, n_templates=3, T=6, seed=6)
    fitter = PureFitter(stack.dims, rank=2)
    for i in range(3):
        for layer, R in stack.reads(p.prompt(i, None), queries=16, seed=i).items():
            fitter.update(layer, R, forget=False)
    for t in range(100):
        for i in range(3):
            for layer, R in stack.reads(p.prompt(i, t), queries=16, seed=50 + i).items():
                fitter.update(layer, R, forget=True, target=t)
        fitter.finish_target(t)  # sequential: statistics of finished targets are freed
        assert t not in fitter.forget
    eraser = fitter.solve()
    for layer in stack.dims:
        Q = eraser.bases[layer]
        assert 100 <= Q.shape[1] <= 200
        torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1]), atol=1e-4, rtol=0)
        G = torch.cat([p.vector(t) for t in range(100)], 1)
        assert torch.linalg.norm(G - Q @ (Q.T @ G)) <= 0.1 * torch.linalg.norm(G)


def test_randomized_solver_matches_exact(stack):
    p = planted(targets=1, seed=7)
    _, exact = fit_planted(stack, p, exact_below=10_000, factor_cap=0)
    _, fast = fit_planted(stack, p, exact_below=0, factor_cap=0, power_iters=3)
    for layer in stack.dims:
        Qe, Qf = exact.bases[layer], fast.bases[layer]
        assert Qe.shape == Qf.shape
        torch.testing.assert_close(Qe @ Qe.T, Qf @ Qf.T, atol=1e-3, rtol=0)


def test_errors_say_what_to_do(stack):
    fitter = PureFitter(stack.dims)
    with pytest.raises(FitError, match="width"):
        fitter.update("layers.0.attn2", torch.zeros(3, 5), forget=True)
    fitter.update("layers.0.attn2", torch.randn(3, 64), forget=True)
    with pytest.raises(FitError, match="retain"):
        fitter.solve()
    with pytest.raises(FitError, match="no forget reads"):
        PureFitter(stack.dims).solve()
    with pytest.raises(FitError, match="no cross-attention layers"):
        PureFitter({})


def test_uce_fast_equals_reference():
    g = torch.Generator().manual_seed(8)
    Ws = {f"w{i}": torch.randn(40 + 8 * i, 32, generator=g, dtype=torch.float64) for i in range(3)}
    C_e, C_a, C_k = (torch.randn(32, n, generator=g, dtype=torch.float64) for n in (6, 6, 20))
    deltas = uce_fast(Ws, C_e, C_a, C_k, lam=0.5, dtype=torch.float64)
    for key, W in Ws.items():
        torch.testing.assert_close(W + deltas[key].dense(), uce_reference(W, C_e, C_a, C_k, lam=0.5))


def test_low_rank_retain_whitening_equals_cholesky():
    """Retain reads of low rank: the Gram-eigen whitening (no Cholesky) gives the Cholesky path's bases."""
    stack = SyntheticStack.build((32, 64), 96, seed=9)
    p = planted(d_c=96, shared=12, targets=2, seed=9)
    retain = [stack.reads(p.prompt(i % 6, None), queries=32, seed=100 + i) for i in range(36)]
    forget = [[stack.reads(p.prompt(i, t), queries=32, seed=200 + i) for i in range(6)] for t in range(2)]
    out = {}
    for lowrank in (0.25, 0.0):
        fitter = PureFitter(stack.dims, rank=4, exact_below=0, power_iters=3, lowrank_retain=lowrank)
        for layer in stack.dims:  # one update: the retain factor is compressed to its rank (12)
            fitter.update(layer, torch.cat([r[layer] for r in retain]), forget=False)
            for t in range(2):
                fitter.update(layer, torch.cat([f[layer] for f in forget[t]]), forget=True, target=t)
        out[lowrank] = (fitter, fitter.solve())
    (fast_fitter, fast), (chol_fitter, chol) = out[0.25], out[0.0]
    assert all(w.L is None for w in fast_fitter._chol.values())
    assert all(w.L is not None for w in chol_fitter._chol.values())
    assert fast_fitter.memory_bytes() < chol_fitter.memory_bytes()
    for layer in stack.dims:
        Qa, Qb = fast.bases[layer], chol.bases[layer]
        assert Qa.shape == Qb.shape and Qa.shape[1] >= 2
        torch.testing.assert_close(Qa @ Qa.T, Qb @ Qb.T, atol=1e-3, rtol=0)
        for a, b in zip(fast.mus[layer], chol.mus[layer]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-3, atol=0)
