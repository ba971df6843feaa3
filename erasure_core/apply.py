"""Applying an ``ErasurePatch``'s weight deltas to a plain ``nn.Module`` (headless use).

ComfyUI objects are patched by ``patches/`` through ModelPatcher; this is the
equivalent for Hugging Face encoders and plain modules, used by the command line
and the tests: the weights are edited in place and restored bit for bit on exit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import PatchMismatchError
from .patch_file import WeightDelta


def _slice(weight: torch.Tensor, offset: tuple[int, int, int] | None) -> torch.Tensor:
    return weight if offset is None else weight.narrow(offset[0], offset[1], offset[2])


@contextmanager
@torch.no_grad()
def applied_deltas(
    module: nn.Module, deltas: Iterable[WeightDelta], *, strength: float = 1.0, key_prefix: str = ""
) -> Iterator[nn.Module]:
    """Within the block, ``W <- W + strength * Delta`` for each delta whose key is in ``module``.

    ``key_prefix`` is stripped from each delta's key to find the parameter. Shapes are
    checked before anything is touched; the original weights are restored in ``finally``.
    """
    params = dict(module.named_parameters())
    todo = []
    for d in deltas:
        name = d.key[len(key_prefix) :] if d.key.startswith(key_prefix) else d.key
        if name not in params:
            raise PatchMismatchError(
                f"the patch edits {d.key!r}, which this model does not have; the patch was fitted on another model"
            )
        target = _slice(params[name], d.offset)
        if tuple(target.shape) != d.shape:
            raise PatchMismatchError(
                f"the patch's delta for {d.key!r} has shape {d.shape}, the model's weight "
                f"has {tuple(target.shape)}; the patch was fitted on another model"
            )
        todo.append((params[name], d))
    backups = [(p, p.detach().clone()) for p, _ in todo]
    try:
        for p, d in todo:
            s = _slice(p.data, d.offset)
            s.copy_((s.float() + strength * d.delta(torch.float32).to(s.device)).to(s.dtype))
        yield module
    finally:
        for p, b in backups:
            p.data.copy_(b)
