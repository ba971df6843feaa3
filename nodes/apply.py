"""Node "Apply Erasure Patch": any patch on clones of MODEL and CLIP, dispatched by method and model family."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from .common import CATEGORY, NODE_PREFIX, ErasurePatchType


def _clip_families(clip: Any) -> list[str]:
    """Display names of the families whose text encoders this CLIP holds exactly."""
    from ..patches.clip_encoder import available_encoders
    from ..patches.families import FAMILIES

    have = set(available_encoders(clip))
    seen: list[str] = []
    for spec in FAMILIES.values():
        if set(spec.encoders) == have and spec.display not in seen:
            seen.append(spec.display)
    return seen


def check_clip_family(clip: Any, patch: Any) -> None:
    """Refuse a patch whose text-encoder edits need encoders this CLIP does not have, naming both families."""
    from erasure_core.errors import PatchMismatchError

    from ..patches.clip_encoder import available_encoders
    from ..patches.families import family_display

    needed = {d.key.split(".", 1)[0] for d in patch.clip_deltas()} | {m.encoder for m in patch.clear_modules}
    have = set(available_encoders(clip))
    missing = sorted(needed - have)
    if not missing:
        return
    fitted = family_display(patch.model_family) if patch.model_family not in ("hf", "generic") else "another model"
    this = " / ".join(_clip_families(clip)) or f"a CLIP with {', '.join(sorted(have)) or 'no known encoder'}"
    raise PatchMismatchError(
        f"this patch was fitted on {fitted} (it edits {', '.join(missing)}), but the CLIP is {this}. "
        f"Load the {fitted} text encoder, or fit a new eraser for {this} with the 'Fit Concept Eraser' node."
    )


def apply_patch(model: Any, clip: Any, patch: Any, strength: float) -> tuple[Any, Any]:
    """Weight deltas via ``patches.apply.apply_weight_patch``, CLEAR modules via ``patches.clear.apply_clear``."""
    from erasure_core.errors import PatchMismatchError

    from ..patches.apply import apply_weight_patch, check_family

    if model is None and clip is None:
        raise PatchMismatchError("connect a MODEL and/or a CLIP to Apply Erasure Patch")
    check_family(model, patch)
    if clip is not None:
        check_clip_family(clip, patch)
    if patch.deltas:
        model, clip = apply_weight_patch(model, clip, patch, strength)
    if patch.clear_modules:
        if clip is None:
            raise PatchMismatchError("this CLEAR patch works in the text encoder: connect a CLIP to apply it")
        from ..patches.clear import apply_clear

        clip = apply_clear(clip, patch, strength)
    if not patch.deltas and not patch.clear_modules:
        raise PatchMismatchError(f"this {patch.method} patch is empty (no weight edits, no CLEAR modules)")
    return model, clip


class ApplyPatch(io.ComfyNode):
    """MODEL / CLIP + ERASURE_PATCH + strength -> patched clones (inputs are never modified)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}ApplyPatch",
            display_name="Apply Erasure Patch",
            category=f"{CATEGORY}/apply",
            description=(
                "Apply a concept-erasure patch of any method: weight edits (PURE, HiRM, ErasePro) on the MODEL "
                "and/or CLIP, CLEAR's intervention on the CLIP. Works on copies; stacks with LoRAs and other "
                "patches; a patch fitted on another model family is refused."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="The diffusion model the patch was fitted on (needed for K/V edits: PURE, ErasePro).",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="The text encoder the patch was fitted on (needed for HiRM, CLEAR and ErasePro's "
                    "text-encoder stages).",
                ),
                ErasurePatchType.Input("patch", tooltip="The patch, from Load Erasure Patch or Fit Concept Eraser."),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=4.0,
                    step=0.05,
                    tooltip="0 = off (the original model exactly), 1 = as fitted; CLEAR: gamma times the stored "
                    "default strength.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL",
                    tooltip="A patched copy of the MODEL (the input itself if the patch has no model edits).",
                ),
                io.Clip.Output(
                    display_name="CLIP",
                    tooltip="A patched copy of the CLIP (the input itself if the patch has no text-encoder edits): "
                    "encode the prompts with it.",
                ),
            ],
        )

    @classmethod
    def execute(cls, patch, strength: float, model=None, clip=None) -> io.NodeOutput:
        model, clip = apply_patch(model, clip, patch, float(strength))
        return io.NodeOutput(model, clip)


NODES = [ApplyPatch]
