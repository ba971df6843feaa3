"""Node "CLEAR Layer Intervene": a CLIP whose chosen text-encoder block subtracts the concept's SAE features."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, NODE_PREFIX, ErasurePatchType


class ClearIntervene(io.ComfyNode):
    """CLIP + CLEAR patch + gamma (+ optional block override) -> CLIP (a patched clone)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}ClearIntervene",
            display_name="CLEAR Layer Intervene",
            category=f"{CATEGORY}/apply",
            description=(
                "Erase a concept inside the text encoder: at the block CLEAR chose, subtract the concept's "
                "specific sparse-autoencoder features. Prompts without the concept are left unchanged."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder (CLIP) of the model the patch was fitted on."),
                ErasurePatchType.Input("patch", tooltip="A CLEAR patch (from Load Erasure Patch or the fit node)."),
                io.Float.Input(
                    "gamma",
                    default=1.0,
                    min=0.0,
                    max=5.0,
                    step=0.05,
                    tooltip="Strength: 0 = off, 1 = as fitted (times the patch's stored default), >1 = stronger.",
                ),
                io.Int.Input(
                    "layer_override",
                    default=-1,
                    min=-1,
                    max=128,
                    optional=True,
                    tooltip="-1: intervene at the block the fit chose. Another value moves the intervention to "
                    "that block (for comparison only: the features were learned at the chosen block).",
                ),
            ],
            outputs=[
                io.Clip.Output(display_name="clip", tooltip="A patched copy of the CLIP: encode the prompts with it.")
            ],
        )

    @classmethod
    def execute(cls, clip, patch, gamma: float, layer_override: int = -1) -> io.NodeOutput:
        from ..patches.clear import apply_clear
        from .apply import check_clip_family

        check_clip_family(clip, patch)  # a patch of another family: refused, naming both families
        override = None if layer_override is None or layer_override < 0 else int(layer_override)
        return io.NodeOutput(apply_clear(clip, patch, gamma, override))


NODES = [ClearIntervene]
