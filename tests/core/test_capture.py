"""ActivationCapture: stores clones, always removes its hooks, stops early, captures inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from erasure_core.capture import ActivationCapture, first_tensor


class Residual(nn.Module):
    """A CLIP/T5-style block that adds to its input in place (``x += f(x)``) and returns it."""

    def __init__(self, d: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(d, d)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(d, d, generator=g) / d**0.5)
            self.lin.bias.copy_(torch.randn(d, generator=g))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x += self.lin(x)
        return x


class TupleOut(nn.Module):
    """A block returning ``(hidden, extra)`` like HF layers."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.inner(x), None


class Chain(nn.Module):
    def __init__(self, n: int = 4, d: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Residual(d, seed=i) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for b in self.blocks:
            x = b(x)
        return x


def _reference(chain: Chain, x: torch.Tensor) -> list[torch.Tensor]:
    """Block outputs computed without in-place sharing."""
    outs, h = [], x
    with torch.no_grad():
        for b in chain.blocks:
            h = h + b.lin(h)
            outs.append(h)
    return outs


def _hooks(m: nn.Module) -> int:
    return sum(len(s._forward_hooks) + len(s._forward_pre_hooks) for s in m.modules())


def test_in_place_blocks_do_not_corrupt_stored_outputs():
    torch.manual_seed(0)
    chain, x = Chain(), torch.randn(2, 5, 6)
    ref = _reference(chain, x)
    names = [f"blocks.{i}" for i in range(4)]
    with torch.no_grad(), ActivationCapture(chain, names) as cap:
        out = chain(x)
    for i, n in enumerate(names):
        assert len(cap.outputs[n]) == 1
        torch.testing.assert_close(cap.outputs[n][0], ref[i])
    torch.testing.assert_close(out, ref[-1])
    # a naive hook that stores references sees every block's output overwritten by later blocks
    naive = []
    h = chain.blocks[0].register_forward_hook(lambda m, i, o: naive.append(o))
    with torch.no_grad():
        chain(x)
    h.remove()
    assert not torch.allclose(naive[0], ref[0])


@pytest.mark.parametrize(
    "transform",
    [
        pytest.param(lambda t: t[:, 1:], id="row-slice-view"),
        pytest.param(lambda t: t[1], id="batch-select-view"),
        pytest.param(lambda t: t.float(), id="no-op-cast"),
        pytest.param(lambda t: t.reshape(-1, t.shape[-1]), id="reshape-view"),
    ],
)
def test_transform_returning_a_view_is_cloned(transform):
    torch.manual_seed(1)
    chain, x = Chain(), torch.randn(2, 5, 6)
    ref = _reference(chain, x)
    with torch.no_grad(), ActivationCapture(chain, ["blocks.0"], transform=transform) as cap:
        chain(x)
    torch.testing.assert_close(cap.outputs["blocks.0"][0], transform(ref[0]))


def test_one_entry_per_call():
    chain, x = Chain(), torch.randn(1, 3, 6)
    with torch.no_grad(), ActivationCapture(chain, ["blocks.1"]) as cap:
        chain(x)
        chain(x * 2)
    assert len(cap.outputs["blocks.1"]) == 2
    assert not torch.allclose(cap.outputs["blocks.1"][0], cap.outputs["blocks.1"][1])


def test_hooks_removed_after_the_block():
    chain = Chain()
    before = _hooks(chain)
    with ActivationCapture(chain, ["blocks.0", "blocks.2"]) as cap:
        assert _hooks(chain) == before + 2
        with torch.no_grad():
            chain(torch.randn(1, 2, 6))
    assert _hooks(chain) == before
    n = len(cap.outputs["blocks.0"])
    with torch.no_grad():
        chain(torch.randn(1, 2, 6))
    assert len(cap.outputs["blocks.0"]) == n  # nothing recorded after exit


def test_hooks_removed_when_the_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    chain = Chain()
    chain.blocks.append(Boom())
    before = _hooks(chain)
    with pytest.raises(RuntimeError, match="boom"), ActivationCapture(chain, ["blocks.0", "blocks.1"]) as cap:
        with torch.no_grad():
            chain(torch.randn(1, 2, 6))
    assert _hooks(chain) == before
    assert len(cap.outputs["blocks.0"]) == 1  # captured before the error


def test_hooks_removed_when_a_name_is_wrong():
    chain = Chain()
    before = _hooks(chain)
    with pytest.raises(AttributeError), ActivationCapture(chain, ["blocks.0", "blocks.nope"]):
        pass
    assert _hooks(chain) == before


def test_stop_early_skips_later_modules():
    chain, x = Chain(n=5), torch.randn(1, 3, 6)
    ref = _reference(chain, x)
    with torch.no_grad(), ActivationCapture(chain, ["blocks.0", "blocks.2"], stop_early=True) as cap:
        result = cap.run(lambda: chain(x))
    assert result is None
    assert [b.calls for b in chain.blocks] == [1, 1, 1, 0, 0]
    torch.testing.assert_close(cap.outputs["blocks.2"][0], ref[2])
    # run() again: stops again at the same place
    with torch.no_grad(), ActivationCapture(chain, ["blocks.1"], stop_early=True) as cap:
        cap.run(lambda: chain(x))
        cap.run(lambda: chain(x))
    assert [b.calls for b in chain.blocks] == [3, 3, 1, 0, 0]
    assert len(cap.outputs["blocks.1"]) == 2
    assert _hooks(chain) == 0


def test_run_without_stop_early_returns_the_result():
    chain, x = Chain(n=3), torch.randn(1, 3, 6)
    with torch.no_grad(), ActivationCapture(chain, ["blocks.0"]) as cap:
        out = cap.run(lambda: chain(x))
    assert out is not None and [b.calls for b in chain.blocks] == [1, 1, 1]


def test_input_capture():
    chain, x = Chain(n=3), torch.randn(2, 4, 6)
    ref = _reference(chain, x)
    with torch.no_grad(), ActivationCapture(chain, ["blocks.0", "blocks.2"], what="input") as cap:
        chain(x)
    torch.testing.assert_close(cap.outputs["blocks.0"][0], x)  # the input, not corrupted by block 0's x +=
    torch.testing.assert_close(cap.outputs["blocks.2"][0], ref[1])


def test_tuple_outputs_and_transform():
    torch.manual_seed(2)
    inner = Residual(6, seed=9)
    model = nn.Sequential(TupleOut(inner))
    x = torch.randn(2, 3, 6)
    expected = (x + inner.lin(x)).detach()
    with torch.no_grad(), ActivationCapture(model, ["0"], transform=lambda t: t.double()) as cap:
        model(x.clone())
    got = cap.outputs["0"][0]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected.double())


def test_first_tensor_and_argument_errors():
    t = torch.zeros(1)
    assert first_tensor(t) is t and first_tensor((t, None)) is t and first_tensor([t]) is t
    with pytest.raises(TypeError, match="cannot find a tensor"):
        first_tensor({"x": t})
    with pytest.raises(ValueError, match="at least one module name"):
        ActivationCapture(Chain(), [])
