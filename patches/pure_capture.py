"""Capture PURE's read vectors ``R = A c`` during real sampling, on a clone of the user's MODEL.

COMFYUI.md §2.4, §7. ``ReadCapture.attach(clone)`` adds one APPLY_MODEL wrapper under a
namespaced key; for the duration of each model call it registers forward hooks on the
cross-attention modules and removes them in ``finally``. The hooks compute, from the
module's own inputs and weights, the head-averaged attention probabilities of a subsample
of at most ``q_max`` image queries over the text keys, for the conditional batch chunk only
(``transformer_options["cond_or_uncond"]``), and pass ``R = A c`` (``(Q, d_c)``, ``c`` = the
K/V input) to ``sink(layer, R)``. The model's own attention is untouched.

Per family (``FamilySpec.capture``):

* ``attn2`` (SD1.5/SDXL): pre-hook on ``...attn2`` (``CrossAttention``): ``q = to_q(x)``,
  ``k = to_k(context)``, ``c = context`` (the text-encoder output, same at every layer and step).
  When a patch passes a separate ``value`` to attn2, the read is still taken over ``context``.
* ``wan_text_embedding`` (Wan): pre-hook on ``blocks.{i}.cross_attn``: ``q = norm_q(q(x))``,
  ``k = norm_k(k(c))`` (RMSNorm over the full width after ``k``, as the model does),
  ``c = text_embedding(context)`` (the module's K/V input). I2V image K/V are not read.
* ``flux_txt`` (Flux double blocks): a pre-hook on ``double_blocks.{i}`` keeps ``pe``; hooks
  on ``img_attn.qkv`` and ``txt_attn.qkv`` give image q/k and text k, normalised by the
  block's ``QKNorm`` and rotated by RoPE like ``flux.math.attention``; ``c`` is the text
  stream's modulated input of ``txt_attn.qkv``. ``A`` is the joint softmax of image queries
  over [text, image] keys, restricted to the text columns (rows sum to the mass read from
  text). Simplifications: attention masks are ignored; single-stream blocks are not read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from erasure_core.pure.reads import head_mean_attention, read_vectors, subsample

from .apply import NAMESPACE
from .families import FamilySpec

log = logging.getLogger(__name__)

CAPTURE_KEY = f"{NAMESPACE}.pure_capture"
Sink = Callable[[str, torch.Tensor], None]


def _cond_rows(batch: int, cond_or_uncond: list[int] | None) -> torch.Tensor | None:
    """Batch indices of the conditional chunks (``None``: all rows)."""
    if not cond_or_uncond:
        return None
    n = len(cond_or_uncond)
    if batch % n:
        return None
    per = batch // n
    rows = [i * per + j for i, c in enumerate(cond_or_uncond) if c == 0 for j in range(per)]
    return torch.tensor(rows, dtype=torch.long)


def _rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Flux RoPE (``flux.math.apply_rope1``): ``x`` ``(H, L, hd)``, ``pe`` ``(1, L, hd/2, 2, 2)``."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(*x.shape)


class ReadCapture:
    """Computes read vectors at the cross-attention layers of one model family.

    ``layers``: the ``KVTarget.layer`` paths (inside ``diffusion_model``) to read;
    ``sink(layer, R)`` receives ``R`` (``(Q, d_c)``, float32, on the model's device).
    """

    def __init__(self, spec: FamilySpec, layers: list[str], sink: Sink, *, q_max: int = 256, seed: int = 0) -> None:
        self.spec, self.layers, self.sink, self.q_max = spec, list(dict.fromkeys(layers)), sink, q_max
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def attach(self, patcher: Any) -> None:
        """Add the wrapper to ``patcher`` (a clone), replacing an earlier capture wrapper."""
        import comfy.patcher_extension as pe

        wrappers = patcher.wrappers.get(pe.WrappersMP.APPLY_MODEL, {})
        wrappers.pop(CAPTURE_KEY, None)
        patcher.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, CAPTURE_KEY, self.wrapper)

    @staticmethod
    def detach(patcher: Any) -> None:
        """Remove the capture wrapper from ``patcher`` (the hooks themselves live only inside a model call)."""
        import comfy.patcher_extension as pe

        patcher.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, CAPTURE_KEY)

    def wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        dm = executor.class_obj.diffusion_model
        to = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        self.calls += 1
        handles = self._register(dm, (to or {}).get("cond_or_uncond"))
        try:
            return executor(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ hooks
    def _queries(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Conditional rows of ``x`` (``(B, N, C)``), queries subsampled: ``(b, Q, C)``."""
        if rows is not None:
            x = x[rows.to(x.device)]
        idx = subsample(x.shape[1], self.q_max, self.generator)
        return x if idx is None else x[:, idx.to(x.device)]

    def _emit(self, layer: str, q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, **kw: Any) -> None:
        """``q``: ``(b, H, Q, hd)``, ``k``: ``(b, H, T, hd)``, ``c``: ``(b, T, d_c)``."""
        for i in range(q.shape[0]):
            extra = {"other_k": kw["other_k"][i]} if "other_k" in kw else {}
            A = head_mean_attention(q[i], k[i], **extra)
            self.sink(layer, read_vectors(A, c[i]))

    def _register(self, dm: torch.nn.Module, cond_or_uncond: list[int] | None) -> list[Any]:
        kind = self.spec.capture
        handles: list[Any] = []
        for layer in self.layers:
            module = dm.get_submodule(layer)
            if kind == "attn2":
                handles.append(
                    module.register_forward_pre_hook(self._attn2_hook(layer, cond_or_uncond), with_kwargs=True)
                )
            elif kind == "wan_text_embedding":
                handles.append(
                    module.register_forward_pre_hook(self._wan_hook(layer, cond_or_uncond), with_kwargs=True)
                )
            else:
                block = dm.get_submodule(layer.rsplit(".", 1)[0])
                handles.extend(self._flux_hooks(layer, block, cond_or_uncond))
        return handles

    @staticmethod
    def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, w = t.shape
        return t.reshape(b, n, heads, w // heads).transpose(1, 2)

    def _attn2_hook(self, layer: str, cond_or_uncond: list[int] | None) -> Callable:
        def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0]
            context = kwargs.get("context", args[1] if len(args) > 1 else None)
            context = x if context is None else context
            rows = _cond_rows(x.shape[0], cond_or_uncond)
            xq = self._queries(x, rows)
            c = context if rows is None or context.shape[0] != x.shape[0] else context[rows.to(x.device)]
            with torch.no_grad():
                q = self._heads(mod.to_q(xq), mod.heads)
                k = self._heads(mod.to_k(c), mod.heads)
                self._emit(layer, q, k, c)

        return hook

    def _wan_hook(self, layer: str, cond_or_uncond: list[int] | None) -> Callable:
        def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0]
            context = kwargs.get("context", args[1] if len(args) > 1 else None)
            rows = _cond_rows(x.shape[0], cond_or_uncond)
            xq = self._queries(x, rows)
            c = context if rows is None or context.shape[0] != x.shape[0] else context[rows.to(x.device)]
            with torch.no_grad():
                q = self._heads(mod.norm_q(mod.q(xq)), mod.num_heads)
                k = self._heads(mod.norm_k(mod.k(c)), mod.num_heads)
                self._emit(layer, q, k, c)

        return hook

    def _flux_hooks(self, layer: str, block: torch.nn.Module, cond_or_uncond: list[int] | None) -> list[Any]:
        state: dict[str, Any] = {}
        heads = block.num_heads

        def pre(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            state["pe"] = kwargs.get("pe", args[3] if len(args) > 3 else None)

        def split(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            b, n, _ = out.shape
            qkv = out.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
            return qkv[0], qkv[1]  # (b, H, n, hd)

        def img_hook(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            state["rows"] = rows = _cond_rows(out.shape[0], cond_or_uncond)
            if rows is not None:
                out = out[rows.to(out.device)]
            with torch.no_grad():
                q, k = split(out)
                state["img_q"] = block.img_attn.norm.query_norm(q)
                state["img_k"] = block.img_attn.norm.key_norm(k)

        def txt_hook(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            if "img_q" not in state:
                return
            rows = state["rows"]
            c = args[0]
            if rows is not None and c.shape[0] == out.shape[0]:
                c, out = c[rows.to(c.device)], out[rows.to(out.device)]
            with torch.no_grad():
                _, k = split(out)
                k = block.txt_attn.norm.key_norm(k)
                img_q, img_k = state.pop("img_q"), state.pop("img_k")
                n_txt, n_img = k.shape[2], img_q.shape[2]
                pe = state.get("pe")
                flipped = getattr(block, "flipped_img_txt", False)
                if pe is not None:
                    pe_txt = pe[..., n_img:, :, :, :] if flipped else pe[..., :n_txt, :, :, :]
                    pe_img = pe[..., :n_img, :, :, :] if flipped else pe[..., n_txt:, :, :, :]
                    pe_txt, pe_img = pe_txt[: k.shape[0]].float(), pe_img[: k.shape[0]].float()
                    k, img_q, img_k = _rope(k, pe_txt), _rope(img_q, pe_img), _rope(img_k, pe_img)
                idx = subsample(n_img, self.q_max, self.generator)
                if idx is not None:
                    img_q = img_q[:, :, idx.to(img_q.device)]
                self._emit(layer, img_q, k, c, other_k=img_k)

        return [
            block.register_forward_pre_hook(pre, with_kwargs=True),
            block.img_attn.qkv.register_forward_hook(img_hook),
            block.txt_attn.qkv.register_forward_hook(txt_hook),
        ]
