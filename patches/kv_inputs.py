"""What each cross-attention K/V weight reads, for a list of conditionings (COMFYUI.md §2.4, §8).

Per conditioning, ``{group: (S, T, d_c)}`` float32 on the CPU: the rows (all tokens,
padding included; the caller selects the real ones) that the K/V weights of ``group``
multiply, for ``S`` captured calls:

* SD1.5 / SDXL (``capture="attn2"``): the conditioning itself, group ``"context"``, ``S = 1``;
* Wan (``"wan_text_embedding"``): ``diffusion_model.text_embedding(cond)``, group ``"text_embedding"``;
* Flux (``"flux_txt"``): per double block ``i`` the input of ``double_blocks.{i}.txt_attn.qkv`` (the
  text stream after ``txt_norm1`` and the modulation), group ``"double_blocks.{i}"``, one entry per
  sampling step of a short run of a clone (cfg 1, so only the conditional chunk runs; other chunks
  are dropped by ``cond_or_uncond`` anyway). The forward hooks are added by an ``APPLY_MODEL``
  wrapper for the duration of each call only, so nothing leaks into other clones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from erasure_core.errors import ErasureError
from erasure_core.progress import ProgressFn, noop_progress

from .families import FamilySpec, detect_family

log = logging.getLogger(__name__)

WRAPPER_KEY = "concept_erasure_kv_capture"


def kv_group(spec: FamilySpec, layer: str) -> str:
    """The input group of a K/V layer (``KVTarget.layer``): layers of one group read the same rows."""
    if spec.capture == "attn2":
        return "context"
    if spec.capture == "wan_text_embedding":
        return "text_embedding"
    return layer.rsplit(".txt_attn", 1)[0]


def _wan_inputs(model: Any, conds: Sequence[list]) -> list[dict[str, torch.Tensor]]:
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    te = model.model.diffusion_model.text_embedding
    weight = next(te.parameters())
    dtype = getattr(model.model, "manual_cast_dtype", None) or weight.dtype
    out = []
    with torch.no_grad():
        for c in conds:
            x = c[0][0].to(weight.device, dtype)
            out.append({"text_embedding": te(x)[0:1].float().cpu()})
    return out


def _flux_inputs(
    model: Any, conds: Sequence[list], *, steps: int, seed: int, latent_size: int, progress: ProgressFn
) -> list[dict[str, torch.Tensor]]:
    import comfy.patcher_extension as pe
    import comfy.sample

    captured: dict[str, list[torch.Tensor]] = {}

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        chunks = list(options.get("cond_or_uncond", [0]))
        blocks = executor.class_obj.diffusion_model.double_blocks
        handles = []

        def hook(i: int):
            def fn(module: torch.nn.Module, inputs: tuple) -> None:
                x = inputs[0].detach()
                parts = x.chunk(len(chunks)) if len(chunks) > 1 else [x]
                for part, which in zip(parts, chunks):
                    if which == 0:
                        captured.setdefault(f"double_blocks.{i}", []).append(part[0:1].float().cpu().clone())

            return fn

        try:
            for i, blk in enumerate(blocks):
                handles.append(blk.txt_attn.qkv.register_forward_pre_hook(hook(i)))
            return executor(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    clone = model.clone()
    clone.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
    channels = model.model.latent_format.latent_channels
    side = max(latent_size // 8, 2)
    out = []
    for k, c in enumerate(conds):
        captured.clear()
        latent = torch.zeros(1, channels, side, side)
        noise = comfy.sample.prepare_noise(latent, seed)
        comfy.sample.sample(clone, noise, steps, 1.0, "euler", "simple", c, c, latent, seed=seed, disable_pbar=True)
        if not captured:
            raise ErasureError("no Flux double-block text inputs were captured; is this a Flux model?")
        out.append({g: torch.cat(v) for g, v in captured.items()})
        progress(k + 1, len(conds))
    return out


def kv_inputs(
    model: Any,
    conds: Sequence[list],
    *,
    steps: int = 2,
    seed: int = 0,
    latent_size: int = 256,
    progress: ProgressFn | None = None,
) -> list[dict[str, torch.Tensor]]:
    """For each conditioning (``[[cond, extras]]``), ``{group: (S, T, d_c)}`` (see the module docstring)."""
    progress = progress or noop_progress
    spec = detect_family(model)
    if spec.capture == "attn2":
        return [{"context": c[0][0][0:1].float().cpu()} for c in conds]
    if spec.capture == "wan_text_embedding":
        return _wan_inputs(model, conds)
    return _flux_inputs(model, conds, steps=steps, seed=seed, latent_size=latent_size, progress=progress)
