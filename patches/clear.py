"""CLEAR on ComfyUI CLIP objects: the fit the "Fit Concept Eraser" node calls, and the apply.

``apply_clear(clip, patch, gamma)`` returns a clone of ``clip`` whose chosen block(s)
subtract the concept's specific SAE features (COMFYUI.md §3.4): one object patch on
``<block path>.forward`` per block, a ``ClearBlockForward`` that calls the class's
``forward`` (``T5Block`` returns ``(x, past_bias)``, ``CLIPLayer`` returns ``x``) and then
``erasure_core.clear.apply_interventions`` on its output. Weight keys are unchanged, so
a LoRA on that block still applies. Several CLEAR patches stack: the object patch keeps
a list of entries per block (re-applying a patch replaces its own entries); a foreign
object patch already on that block is called as the base. The input CLIP is never
modified; gamma 0 returns an unpatched clone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from erasure_core.clear.fit import config_dict, measure, to_patch
from erasure_core.clear.fit import fit_clear as core_fit_clear
from erasure_core.clear.intervention import ClearIntervention, apply_interventions
from erasure_core.clear.search import ClearConfig
from erasure_core.errors import ErasureError, PatchMismatchError
from erasure_core.patch_file import ClearModule, ErasurePatch
from erasure_core.progress import ProgressFn
from erasure_core.prompts import ConceptRequest
from erasure_core.report import FitResult, format_metrics

from .clip_encoder import ENCODERS, ComfyTextEncoder, available_encoders, default_encoder
from .families import detect_family

log = logging.getLogger(__name__)

_D = ClearConfig()
OPTIONS: dict[str, dict[str, Any]] = {
    "encoder": {
        "type": "combo",
        "default": "auto",
        "options": ["auto", *ENCODERS],
        "tooltip": "Text encoder to intervene in. auto: umT5-XXL (Wan), T5-XXL (Flux), CLIP-G (SDXL), CLIP-L (SD1.5).",
    },
    "search_steps": {
        "type": "int",
        "default": _D.search_steps,
        "min": 10,
        "max": 100000,
        "tooltip": "Steps of the Gumbel-Softmax layer search (SAE step + layer step each).",
    },
    "finetune_steps": {
        "type": "int",
        "default": _D.finetune_steps,
        "min": 0,
        "max": 100000,
        "tooltip": "SAE fine-tune steps at the chosen block.",
    },
    "topk": {
        "type": "int",
        "default": _D.topk,
        "min": 1,
        "max": 256,
        "tooltip": "Active SAE features per token (TopK sparsity).",
    },
    "width_factor": {
        "type": "int",
        "default": _D.width_factor,
        "min": 1,
        "max": 64,
        "tooltip": "SAE width as a multiple of the encoder width (8 = 8 d features).",
    },
    "gamma": {
        "type": "float",
        "default": _D.gamma,
        "min": 0.0,
        "max": 5.0,
        "tooltip": "Default strength stored in the patch (the intervene node multiplies it).",
    },
}

#: marks the object patches of this pack (COMFYUI.md: one namespace for what the pack attaches)
NAMESPACE = "concept_erasure"


def _hash_module(m: ClearModule) -> str:
    h = hashlib.sha1(f"{m.encoder}|{m.block}|{m.concept}|{m.scale}|{m.topk}".encode())
    h.update(m.W_dec.float().flatten()[:: max(1, m.W_dec.numel() // 512)].numpy().tobytes())
    h.update(m.mask.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ClearEntry:
    """One CLEAR module acting at a block: its id (for replacement), intervention and strength."""

    entry_id: str
    intervention: ClearIntervention
    gamma: float


class ClearBlockForward:
    """The object patch of one block's ``forward``: base forward, then all CLEAR entries on its output."""

    namespace = NAMESPACE

    def __init__(self, module: torch.nn.Module, base: Any, entries: Sequence[ClearEntry]) -> None:
        self.module = module
        self.base = base
        self.entries = tuple(entries)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.base is not None:
            out = self.base(*args, **kwargs)
        else:
            out = type(self.module).forward(self.module, *args, **kwargs)
        x = out[0] if isinstance(out, tuple) else out
        y = apply_interventions(x, [(e.intervention, e.gamma) for e in self.entries])
        if y is x:
            return out
        return (y, *out[1:]) if isinstance(out, tuple) else y


# A small cache so re-running the node keeps the SAE copies already moved to the device.
_INTERVENTIONS: dict[str, ClearIntervention] = {}
_CACHE_SIZE = 16


def _intervention(key: str, module: ClearModule) -> ClearIntervention:
    iv = _INTERVENTIONS.get(key)
    if iv is None:
        if len(_INTERVENTIONS) >= _CACHE_SIZE:
            _INTERVENTIONS.pop(next(iter(_INTERVENTIONS)))
        iv = _INTERVENTIONS[key] = ClearIntervention(module)
    return iv


def _layer_scales(patch: ErasurePatch | None, index: int) -> list[float] | None:
    if patch is None:
        return None
    entries = patch.metrics.get("clear") if isinstance(patch.metrics, dict) else None
    if isinstance(entries, list) and index < len(entries) and isinstance(entries[index], dict):
        scales = entries[index].get("layer_scales")
        blocks = entries[index].get("blocks")
        if isinstance(scales, list) and isinstance(blocks, list) and len(scales) == len(blocks):
            return [scales[blocks.index(b)] if b in blocks else None for b in range(max(blocks) + 1)]
    return None


def _placed(clip: Any, module: ClearModule, override: int | None, scales: list[float] | None) -> ClearModule:
    """``module`` at the block it acts on in ``clip`` (checked), moved to ``override`` if given."""
    names = available_encoders(clip)
    if module.encoder not in names:
        raise PatchMismatchError(
            f"this CLEAR patch was fitted on the {module.encoder!r} text encoder, but this CLIP has "
            f"{', '.join(names) or 'none'}. Use the CLIP of the model it was fitted on, or fit a new eraser."
        )
    enc = ComfyTextEncoder(clip, module.encoder)
    if enc.hidden_size != module.width:
        raise PatchMismatchError(
            f"this CLEAR patch expects {module.encoder} of width {module.width}, this CLIP's is {enc.hidden_size}: "
            "it was fitted on another model. Fit a new eraser for this one."
        )
    block = module.block if override is None else override
    if not 0 <= block < enc.num_blocks:
        raise PatchMismatchError(
            f"block {block} does not exist in {module.encoder} (it has {enc.num_blocks} blocks, 0.."
            f"{enc.num_blocks - 1}); set layer_override to -1 or to one of those"
        )
    if block == module.block:
        return dataclasses.replace(module, block_path=enc.block_path(block))
    scale = scales[block] if scales and block < len(scales) and scales[block] else module.scale
    return dataclasses.replace(module, block=block, block_path=enc.block_path(block), scale=float(scale))


def apply_clear(
    clip: Any,
    patch_or_modules: ErasurePatch | Sequence[ClearModule],
    gamma: float = 1.0,
    layer_override: int | None = None,
) -> Any:
    """A clone of ``clip`` with the CLEAR modules of a patch hooked at their blocks.

    Strength per module = ``gamma * module.default_strength``. ``layer_override`` moves every
    module to that block (an experiment: the SAE was fitted at its own block; the stored
    per-block normalisation scale is used when the patch has one).
    """
    patch = patch_or_modules if isinstance(patch_or_modules, ErasurePatch) else None
    modules = list(patch.clear_modules) if patch is not None else list(patch_or_modules)
    if not modules:
        what = f"a {patch.method} patch" if patch is not None else "an empty list"
        raise PatchMismatchError(
            f"this is {what} without CLEAR modules; apply it with the 'Apply Erasure Patch' node instead"
        )
    if gamma < 0:
        raise ErasureError(f"gamma must be >= 0, got {gamma}")
    placed = [(_placed(clip, m, layer_override, _layer_scales(patch, i)), m) for i, m in enumerate(modules)]
    clone = clip.clone()
    if gamma == 0:
        return clone
    by_path: dict[str, list[ClearEntry]] = {}
    for m, original in placed:
        key = _hash_module(original)
        entry = ClearEntry(f"{key}@{m.block}", _intervention(f"{key}@{m.block}", m), gamma * m.default_strength)
        by_path.setdefault(m.block_path, []).append(entry)
    patcher = clone.patcher
    for path, entries in by_path.items():
        name = f"{path}.forward"
        block = patcher.get_model_object(path)
        existing = patcher.object_patches.get(name)
        if isinstance(existing, ClearBlockForward) or getattr(existing, "namespace", None) == NAMESPACE:
            ids = {e.entry_id for e in entries}
            kept = [e for e in existing.entries if e.entry_id not in ids]
            patcher.add_object_patch(name, ClearBlockForward(block, existing.base, kept + entries))
        else:
            patcher.add_object_patch(name, ClearBlockForward(block, existing, entries))
    return clone


def _candidate_blocks(clip: Any, enc: ComfyTextEncoder) -> tuple[int, ...]:
    """Blocks whose output reaches the conditioning (SDXL reads the penultimate CLIP block, clip skip too)."""
    last = enc.num_blocks - 1
    layer_idx = getattr(clip, "layer_idx", None)
    if layer_idx is None and getattr(enc.wrapper, "layer", None) == "hidden":
        layer_idx = getattr(enc.wrapper, "layer_idx", None)
    if isinstance(layer_idx, int) and enc.layout.kind == "clip":
        last = layer_idx if layer_idx >= 0 else enc.num_blocks + layer_idx
    return tuple(range(0, max(0, min(last, enc.num_blocks - 1)) + 1))


def _family(model: Any) -> str:
    if model is None:
        return "generic"
    return detect_family(model).name


def fit_clear(
    model: Any,
    clip: Any,
    request: ConceptRequest,
    *,
    seed: int = 0,
    progress: ProgressFn | None = None,
    encoder: str = "auto",
    search_steps: int = _D.search_steps,
    finetune_steps: int = _D.finetune_steps,
    topk: int = _D.topk,
    width_factor: int = _D.width_factor,
    gamma: float = _D.gamma,
    **extra: Any,
) -> FitResult:
    """Fit CLEAR on one encoder of ``clip`` (neither ``model`` nor ``clip`` is modified).

    ``extra``: further ``ClearConfig`` fields (``eps_shared``, ``blocks``, ``lr_sae``...).
    """
    if clip is None:
        raise ErasureError("CLEAR works in the text encoder: connect a CLIP to the fit node")
    name = default_encoder(clip) if encoder in ("auto", "", None) else encoder
    enc = ComfyTextEncoder(clip, name)
    unknown = set(extra) - {f.name for f in dataclasses.fields(ClearConfig)}
    if unknown:
        raise ErasureError(f"unknown CLEAR option(s): {', '.join(sorted(unknown))}")
    extra.setdefault("blocks", _candidate_blocks(clip, enc))
    config = ClearConfig(
        search_steps=search_steps,
        finetune_steps=finetune_steps,
        topk=topk,
        width_factor=width_factor,
        gamma=gamma,
        **extra,
    )
    import comfy.model_management as mm

    device = mm.get_torch_device()
    fit = core_fit_clear(enc, request, config=config, seed=seed, progress=progress, device=device)
    edited = apply_clear(clip, list(fit.modules), 1.0)
    after = ComfyTextEncoder(edited, name)
    report = measure(
        lambda ps: [e.output for e in enc.encode(ps)], lambda ps: [e.output for e in after.encode(ps)], fit.sets
    )
    fit_config = dict(config_dict(config), encoder=name)
    patch = to_patch(fit, enc, request, model_family=_family(model), fit_config=fit_config, report=report)
    from erasure_core.clear.report import draw_report

    image = draw_report(fit, title=f"CLEAR on {name}")
    blocks = ", ".join(f"{t.concept!r} -> block {t.module.block} ({t.num_specific} features)" for t in fit.targets)
    summary = f"CLEAR on {name}: {blocks}. " + format_metrics(report.as_dict())
    return FitResult(patch, image, summary, {"fit": fit})
