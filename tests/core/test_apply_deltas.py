"""Headless application of weight deltas: edits inside the block, bit-for-bit restore after."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from erasure_core.apply import applied_deltas
from erasure_core.errors import PatchMismatchError
from erasure_core.patch_file import WeightDelta, make_delta


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    m = nn.ModuleDict({"q": nn.Linear(8, 8), "qkv": nn.Linear(8, 24, bias=False), "out": nn.Linear(8, 4)})
    return m.to(dtype)


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_identical(m: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    for k, v in m.state_dict().items():
        assert v.dtype == snap[k].dtype and torch.equal(v, snap[k]), k


def _delta(key, shape, *, offset=None, seed=1, low_rank=True):
    g = torch.Generator().manual_seed(seed)
    if low_rank:
        return make_delta(
            key, "model", torch.randn(shape[0], 1, generator=g), torch.randn(1, shape[1], generator=g), offset=offset
        )
    return WeightDelta(key, "model", dense=torch.randn(*shape, generator=g), offset=offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_changes_inside_and_restores_bit_for_bit(dtype):
    m = _model(dtype)
    snap = _snapshot(m)
    d1 = _delta("q.weight", (8, 8))
    d2 = _delta("out.weight", (4, 8), seed=2, low_rank=False)
    x = torch.randn(3, 8).to(dtype)
    before = m["q"](x)
    with applied_deltas(m, [d1, d2], strength=0.5) as mm:
        assert mm is m
        expected = (snap["q.weight"].float() + 0.5 * d1.delta()).to(dtype)
        assert torch.equal(m["q"].weight, expected)
        assert torch.equal(m["out"].weight, (snap["out.weight"].float() + 0.5 * d2.delta()).to(dtype))
        assert torch.equal(m["q"].bias, snap["q.bias"])  # untouched parameters stay
        assert not torch.equal(m["q"](x), before)
    _assert_identical(m, snap)
    assert torch.equal(m["q"](x), before)


def test_restores_when_an_exception_is_raised_inside():
    m = _model()
    snap = _snapshot(m)
    with pytest.raises(RuntimeError, match="sampler crashed"), applied_deltas(m, [_delta("q.weight", (8, 8))]):
        assert not torch.equal(m["q"].weight, snap["q.weight"])
        raise RuntimeError("sampler crashed")
    _assert_identical(m, snap)


def test_offset_slices_change_only_their_rows():
    m = _model()
    snap = _snapshot(m)
    k = _delta("qkv.weight", (8, 8), offset=(0, 8, 8), seed=3)
    v = _delta("qkv.weight", (8, 8), offset=(0, 16, 8), seed=4, low_rank=False)
    with applied_deltas(m, [k, v]):
        w, w0 = m["qkv"].weight, snap["qkv.weight"]
        assert torch.equal(w[:8], w0[:8])  # q rows untouched
        torch.testing.assert_close(w[8:16], w0[8:16] + k.delta())
        torch.testing.assert_close(w[16:], w0[16:] + v.delta())
    _assert_identical(m, snap)


def test_strength_zero_is_a_no_op_and_negative_reverses():
    m = _model()
    snap = _snapshot(m)
    d = _delta("q.weight", (8, 8))
    with applied_deltas(m, [d], strength=0.0):
        _assert_identical(m, snap)
    with applied_deltas(m, [d], strength=-1.0):
        torch.testing.assert_close(m["q"].weight, snap["q.weight"] - d.delta())


def test_key_prefix_is_stripped():
    m = _model()
    snap = _snapshot(m)
    d = _delta("clip_l.transformer.q.weight", (8, 8))
    with applied_deltas(m, [d], key_prefix="clip_l.transformer."):
        assert not torch.equal(m["q"].weight, snap["q.weight"])
    _assert_identical(m, snap)


def test_unknown_key_raises_before_touching_anything():
    m = _model()
    snap = _snapshot(m)
    good, bad = _delta("q.weight", (8, 8)), _delta("k.weight", (8, 8))
    with pytest.raises(PatchMismatchError, match="the patch edits 'k.weight', which this model does not have"):
        with applied_deltas(m, [good, bad]):
            pytest.fail("the block must not run")
    _assert_identical(m, snap)


def test_shape_mismatch_raises_before_touching_anything():
    m = _model()
    snap = _snapshot(m)
    with pytest.raises(PatchMismatchError, match=r"has shape \(8, 16\), the model's weight has \(4, 8\)"):
        with applied_deltas(m, [_delta("q.weight", (8, 8)), _delta("out.weight", (8, 16))]):
            pass
    with pytest.raises(PatchMismatchError, match="the model's weight has"):
        with applied_deltas(m, [_delta("qkv.weight", (8, 8), offset=(0, 8, 16))]):
            pass
    _assert_identical(m, snap)
