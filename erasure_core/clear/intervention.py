"""CLEAR's intervention at one block's output (METHODS.md, CLEAR step 7).

For every token ``h`` (``(d,)``) of the block output::

    f  = act(W_enc (h / scale - b_dec) + b_enc)
    h' = h - gamma * scale * W_dec (f * m_spec)         (no decoder bias)

Only the specific features are decoded (``W_dec[:, m_spec]``, ``s`` columns). With a
ReLU SAE only their encoder rows are computed too; TopK needs all ``m`` pre-activations
to know which ``k`` win. Tokens on which no specific feature fires are copied as they
are (bit-identical), and ``gamma = 0`` returns the input tensor itself.

Several modules at one block act on the *same* block output and their corrections
add (``apply_interventions``), so the result does not depend on their order.

SAE tensors are moved lazily to the hidden state's device and cached per
``(device, dtype)`` (no copy when they are already there: ``W_enc`` is used as
stored). The compute dtype is the hidden state's on accelerators when it is
fp16/bf16, float32 otherwise (CPU half-precision matmuls are slow and inexact).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..adapters.base import TextEncoderAdapter
from ..capture import first_tensor
from ..patch_file import ClearModule

__all__ = ["ClearIntervention", "apply_interventions", "intervened"]


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    if h.dtype in (torch.float16, torch.bfloat16) and h.device.type != "cpu":
        return h.dtype
    return torch.float32


class ClearIntervention:
    """The intervention of one ``ClearModule``; ``intervention(h, gamma)`` -> ``h'`` (any shape ``(..., d)``)."""

    def __init__(self, module: ClearModule) -> None:
        self.module = module
        self.spec = module.mask.bool().nonzero().squeeze(1)
        self._cache: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    @property
    def num_specific(self) -> int:
        return int(self.spec.numel())

    def _tensors(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            m = self.module
            spec = self.spec
            t = {"b_dec": m.b_dec, "W_dec_spec_t": m.W_dec[:, spec].t()}
            if m.topk > 0:
                pos = torch.full((m.mask.numel(),), -1, dtype=torch.long)
                pos[spec] = torch.arange(spec.numel())
                t.update(W_enc=m.W_enc, b_enc=m.b_enc, spec_pos=pos)
            else:
                t.update(W_enc=m.W_enc[spec], b_enc=m.b_enc[spec])
            self._cache[key] = {
                k: v.to(device=device, dtype=torch.long if k == "spec_pos" else dtype).contiguous()
                for k, v in t.items()
            }
        return self._cache[key]

    def clear_cache(self) -> None:
        """Drop the device copies (they are rebuilt on the next call)."""
        self._cache.clear()

    @torch.no_grad()
    def correction(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``scale * W_dec (f * m_spec)`` for the tokens that fire a specific feature.

        ``h``: ``(N, d)``. Returns ``(rows, delta)`` with ``rows`` ``(n,)`` the indices of those
        tokens and ``delta`` ``(n, d)`` in the compute dtype, or ``None`` when no token fires one.
        """
        if self.num_specific == 0 or h.shape[0] == 0:
            return None
        m, cd = self.module, _compute_dtype(h)
        t = self._tensors(h.device, cd)
        x = h.to(cd) / m.scale - t["b_dec"]
        pre = x @ t["W_enc"].t() + t["b_enc"]
        if m.topk > 0:
            k = min(m.topk, pre.shape[-1])
            vals, idx = pre.topk(k, dim=-1)
            pos = t["spec_pos"][idx]
            vals = torch.where((pos >= 0) & (vals > 0), vals, torch.zeros_like(vals))
            rows = (vals > 0).any(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                return None
            f = torch.zeros(rows.numel(), self.num_specific, device=h.device, dtype=cd)
            f.scatter_add_(1, pos[rows].clamp_min(0), vals[rows])
        else:
            f = torch.relu(pre)
            rows = (f > 0).any(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                return None
            f = f[rows]
        return rows, (f @ t["W_dec_spec_t"]) * m.scale

    def __call__(self, h: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
        g = self.module.default_strength if gamma is None else gamma
        return apply_interventions(h, [(self, g)])


@torch.no_grad()
def apply_interventions(h: torch.Tensor, items: Sequence[tuple[ClearIntervention, float]]) -> torch.Tensor:
    """``h' = h - sum_i gamma_i * scale_i * W_dec_i (f_i(h) * m_i)`` on one block output ``h`` (``(..., d)``).

    Every ``f_i`` is computed from the unedited ``h``. Rows no module touches keep their
    bits; with nothing to do the input tensor itself is returned.
    """
    flat = h.reshape(-1, h.shape[-1])
    total: torch.Tensor | None = None
    for iv, gamma in items:
        if gamma == 0:
            continue
        corr = iv.correction(flat)
        if corr is None:
            continue
        rows, delta = corr
        if total is None:
            total = torch.zeros(flat.shape, device=h.device, dtype=delta.dtype)
            hit = torch.zeros(flat.shape[0], device=h.device, dtype=torch.bool)
        total.index_add_(0, rows, delta.to(total.dtype), alpha=float(gamma))
        hit[rows] = True
    if total is None:
        return h
    rows = hit.nonzero().squeeze(1)
    out = flat.clone()
    out[rows] = (flat[rows].to(total.dtype) - total[rows]).to(h.dtype)
    return out.reshape(h.shape)


def _replace_first(value: Any, x: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return x
    return type(value)((x, *value[1:])) if isinstance(value, tuple) else [x, *value[1:]]


@contextmanager
def intervened(
    adapter: TextEncoderAdapter, modules: Sequence[ClearModule], gamma: float = 1.0
) -> Iterator[list[ClearIntervention]]:
    """Within the block, CLEAR ``modules`` act on a plain torch encoder (headless evaluation).

    Each module is hooked at ``adapter.layout.block_path(module.block)`` under ``adapter.root``
    with strength ``gamma * module.default_strength``; modules sharing a block stack as in
    ``apply_interventions``. Hooks are removed in ``finally``.
    """
    by_block: dict[str, list[tuple[ClearIntervention, float]]] = {}
    ivs = []
    for m in modules:
        iv = ClearIntervention(m)
        ivs.append(iv)
        by_block.setdefault(adapter.layout.block_path(m.block), []).append((iv, gamma * m.default_strength))
    handles = []
    try:
        for path, items in by_block.items():
            block = adapter.root.get_submodule(path)

            def hook(mod: Any, args: Any, out: Any, items: list = items) -> Any:
                x = first_tensor(out)
                y = apply_interventions(x, items)
                return out if y is x else _replace_first(out, y)

            handles.append(block.register_forward_hook(hook))
        yield ivs
    finally:
        for h in handles:
            h.remove()
