"""Applying an ``ErasurePatch`` to ComfyUI MODEL and CLIP objects, on clones.

Weight deltas become ``add_patches`` entries on a clone's patcher (COMFYUI.md §2.3):
low-rank deltas as ``comfy.weight_adapter.LoRAAdapter(up, down)``, dense ones as
``("diff", (delta,))``, Flux slices with their ``(key, offset)``. They compose
additively with LoRAs, are undone when the node is removed (the input object is
never touched), and strength 0 gives the original weights exactly.

Every entry the pack adds carries the patch's id; applying a patch removes that
id's entries first, so applying the same patch twice never doubles the edit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Any

import torch

from erasure_core.errors import PatchMismatchError
from erasure_core.patch_file import ErasurePatch, WeightDelta, fingerprints_match

from .families import detect_family, family_display

log = logging.getLogger(__name__)

#: the one namespace the pack uses on a ModelPatcher (wrappers, object patches, entries)
NAMESPACE = "concept_erasure"


def patch_id(patch: ErasurePatch) -> str:
    """A stable id of a patch's content (method, family, concept, delta keys and shapes)."""
    h = hashlib.sha1()
    h.update(json.dumps([patch.method, patch.model_family, patch.concept, patch.fit_config], sort_keys=True).encode())
    for d in patch.deltas:
        h.update(f"{d.key}{d.offset}{d.shape}".encode())
        h.update(d.delta(torch.float32).flatten()[:: max(1, d.delta().numel() // 256)].numpy().tobytes())
    for c in patch.clear_modules:
        h.update(f"{c.block_path}{c.concept}".encode())
        h.update(c.W_dec.float().flatten()[:256].numpy().tobytes())
    return h.hexdigest()[:16]


def _lora_adapter(up: torch.Tensor, down: torch.Tensor, pid: str) -> Any:
    import comfy.weight_adapter as wa

    adapter = wa.LoRAAdapter(set(), (up, down, None, None, None, None))
    adapter.erasure_patch_id = pid
    return adapter


class _DiffPatch(tuple):
    """A ``("diff", (tensor,))`` patch value that also carries ``erasure_patch_id``."""

    erasure_patch_id: str = ""


def _patch_value(d: WeightDelta, pid: str) -> Any:
    if d.is_low_rank:
        return _lora_adapter(d.up, d.down, pid)
    value = _DiffPatch(("diff", (d.dense,)))
    value.erasure_patch_id = pid
    return value


def remove_erasure_entries(patcher: Any, pid: str) -> int:
    """Drop every patch entry tagged with ``pid`` from a (cloned) patcher; returns how many."""
    removed = 0
    for key in list(patcher.patches):
        kept = [p for p in patcher.patches[key] if getattr(p[1], "erasure_patch_id", None) != pid]
        removed += len(patcher.patches[key]) - len(kept)
        if kept:
            patcher.patches[key] = kept
        else:
            del patcher.patches[key]
    if removed:
        patcher.patches_uuid = uuid.uuid4()
    return removed


def check_shapes(patcher: Any, deltas: list[WeightDelta], where: str) -> None:
    """Every delta's key exists on ``patcher`` with a matching (slice) shape, before anything is patched."""
    state = patcher.model.state_dict(keep_vars=True)
    for d in deltas:
        if d.key not in state:
            raise PatchMismatchError(
                f"the patch edits {d.key!r}, which this {where} does not have: it was fitted on another model. "
                "Use the model it was fitted on, or fit a new eraser for this one."
            )
        shape = list(state[d.key].shape)
        if d.offset is not None:
            shape[d.offset[0]] = d.offset[2]
        if tuple(shape[:2]) != d.shape:
            raise PatchMismatchError(
                f"the patch's delta for {d.key!r} has shape {d.shape}, the {where}'s weight has {tuple(shape)}: "
                "the patch was fitted on a model of another size. Fit a new eraser for this model."
            )


def add_weight_deltas(patcher_owner: Any, deltas: list[WeightDelta], strength: float, pid: str, where: str) -> Any:
    """Clone ``patcher_owner`` (a ModelPatcher or CLIP) and add ``deltas`` at ``strength``; returns the clone."""
    clone = patcher_owner.clone()
    patcher = clone.patcher if hasattr(clone, "patcher") else clone
    check_shapes(patcher, deltas, where)
    remove_erasure_entries(patcher, pid)
    for d in deltas:
        key = d.key if d.offset is None else (d.key, d.offset)
        accepted = patcher.add_patches({key: _patch_value(d, pid)}, strength)
        if not accepted:
            raise PatchMismatchError(f"ComfyUI did not accept a patch for {d.key!r} on this {where}")
    return clone


def check_family(model: Any, patch: ErasurePatch) -> None:
    """Refuse a patch fitted on another model family, naming both and what to do."""
    if patch.model_family in ("hf", "generic"):
        if patch.model_deltas():
            raise PatchMismatchError(
                "this patch was fitted headless on a plain encoder and has no ComfyUI model family; "
                "fit it on the model with the 'Fit Concept Eraser' node"
            )
        return
    if model is None:
        return
    spec = detect_family(model)
    if spec.name != patch.model_family:
        raise PatchMismatchError(
            f"this patch was fitted on {family_display(patch.model_family)}, but the MODEL is "
            f"{spec.display}. Load a {family_display(patch.model_family)} model, or fit a new eraser for "
            f"{spec.display} with the 'Fit Concept Eraser' node."
        )


def warn_if_other_weights(patcher: Any, patch: ErasurePatch) -> None:
    """Log a warning when the base weights differ from those the patch was fitted on (e.g. a fine-tune)."""
    if not patch.fingerprint:
        return
    patches = patcher.get_key_patches()
    for key, fp in list(patch.fingerprint.items())[:4]:
        if key in patches and not fingerprints_match(fp, _fingerprint(patches[key][0][0])):
            log.warning(
                "concept erasure: the base weight %s differs from the one the patch was fitted on "
                "(a fine-tune or another checkpoint?); the erasure may be weaker",
                key,
            )
            return


def _fingerprint(weight: torch.Tensor) -> dict[str, Any]:
    from erasure_core.patch_file import weight_fingerprint

    return weight_fingerprint(weight)


def apply_weight_patch(model: Any, clip: Any, patch: ErasurePatch, strength: float) -> tuple[Any, Any]:
    """The patch's weight deltas on clones of ``model`` and ``clip`` (``None`` stays ``None``).

    CLEAR modules are not handled here (see ``patches.clear``).
    """
    check_family(model, patch)
    pid = patch_id(patch)
    model_deltas, clip_deltas = patch.model_deltas(), patch.clip_deltas()
    if model_deltas and model is None:
        raise PatchMismatchError("this patch edits the diffusion model: connect a MODEL to apply it")
    if clip_deltas and clip is None:
        raise PatchMismatchError("this patch edits the text encoder: connect a CLIP to apply it")
    if model_deltas:
        warn_if_other_weights(model, patch)
        model = add_weight_deltas(model, model_deltas, strength, pid, "MODEL")
    if clip_deltas:
        clip = add_weight_deltas(clip, clip_deltas, strength, pid, "CLIP")
    return model, clip


def effective_weight(patcher: Any, key: str) -> torch.Tensor:
    """The weight ``key`` of a patcher with all its patches applied (float32, CPU), without loading it."""
    import comfy.lora

    p = patcher.get_key_patches()[key]
    base = p[0][1](p[0][0].float().clone(), inplace=True) if p[0][1] is not None else p[0][0].float().clone()
    return comfy.lora.calculate_weight(p[1:], base.detach(), key, intermediate_dtype=torch.float32).detach()
