"""Leakage, retain drift and the residual of a solve."""

from __future__ import annotations

import pytest
import torch

from erasure_core.metrics import conditioning_report, cosine, leakage, pooled, relative_residual, retain_drift


def _states(seed: int, t: int = 5, d: int = 8) -> torch.Tensor:
    return torch.randn(t, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_leakage_endpoints():
    o, a = _states(0), _states(1)
    assert leakage(o, o, a) == pytest.approx(1.0, abs=1e-12)  # unchanged
    assert leakage(a, o, a) == pytest.approx(0.0, abs=1e-12)  # became the anchor
    assert leakage(0.5 * o + 0.5 * a, o, a) == pytest.approx(0.5, abs=1e-12)
    assert leakage(0.25 * o + 0.75 * a, o, a) == pytest.approx(0.25, abs=1e-12)


def test_leakage_is_clamped():
    o, a = _states(2), _states(3)
    assert leakage(o - (a - o), o, a) == 1.0  # moved away from the anchor
    assert leakage(a + 3 * (a - o), o, a) == 0.0  # overshot the anchor
    for s in torch.linspace(-2, 3, 11):
        assert 0.0 <= leakage(o + s * (a - o), o, a) <= 1.0


def test_leakage_ignores_orthogonal_moves_and_pools_tokens():
    o, a = torch.zeros(3, 4), torch.zeros(3, 4)
    a[:, 0] = 1.0
    e = o.clone()
    e[:, 1] = 5.0  # orthogonal to the anchor direction
    assert leakage(e, o, a) == pytest.approx(1.0)
    # token counts may differ: everything is mean-pooled
    assert leakage(torch.ones(7, 4) * a[0], o, a[:2]) == pytest.approx(0.0)


def test_leakage_degenerate_anchor_equals_original():
    o = _states(4)
    assert leakage(_states(5), o, o) == 1.0  # no direction: counts as untouched, not NaN


def test_retain_drift():
    x = _states(6)
    assert retain_drift(x, x) == pytest.approx(0.0, abs=1e-12)
    assert retain_drift(2.5 * x, x) == pytest.approx(0.0, abs=1e-12)  # scale-free
    assert retain_drift(-x, x) == pytest.approx(2.0, abs=1e-12)
    assert 0.0 < retain_drift(x + 0.1 * _states(7), x) < 0.1


def test_cosine_and_pooled():
    x = _states(8)
    assert pooled(x).dtype == torch.float64 and pooled(x).shape == (8,)
    assert pooled(x[0]).shape == (8,)
    assert cosine(x, x) == pytest.approx(1.0)
    assert cosine(torch.zeros(3), x[0, :3]) == 0.0  # no NaN on a zero vector


def test_relative_residual():
    g = torch.Generator().manual_seed(9)
    W, X = torch.randn(6, 4, generator=g), torch.randn(4, 3, generator=g)
    Y = W @ X
    assert relative_residual(W, X, Y) < 1e-6
    assert relative_residual(torch.zeros(6, 4), X, Y) == pytest.approx(1.0)
    assert relative_residual(2 * W, X, Y) == pytest.approx(1.0, rel=1e-6)


def test_conditioning_report():
    o, a = _states(10), _states(11)
    r = o + 0.01 * _states(12)
    rep = conditioning_report([(a, o, a), (o, o, a)], [(o, o, a)], [(r, o), (o, o)])
    assert rep.forget_leakage == pytest.approx(0.5) and rep.holdout_leakage == pytest.approx(1.0)
    assert rep.retain_cos <= 1.0 and 0.0 <= rep.retain_drift_max < 1e-3
    d = rep.as_dict()
    assert set(d) == {
        "forget_leakage",
        "holdout_leakage",
        "forget_cos_original",
        "forget_cos_anchor",
        "retain_cos",
        "retain_drift_max",
    }
    empty = conditioning_report([], [], [])
    assert all(v != v for v in empty.as_dict().values())  # NaN when a group is empty
