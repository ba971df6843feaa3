"""Node "PURE Project K/V": a MODEL whose cross-attention K/V no longer read the erased concept."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, NODE_PREFIX, ErasurePatchType


class PureProject(io.ComfyNode):
    """MODEL + PURE patch + strength -> MODEL (a patched clone)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}PureProject",
            display_name="PURE Project K/V",
            category=f"{CATEGORY}/apply",
            description=(
                "Erase a concept in the diffusion model: project the text directions the concept is read "
                "through out of every cross-attention key and value (a low-rank weight edit; stacks with LoRAs)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the PURE patch was fitted on."),
                ErasurePatchType.Input("patch", tooltip="A PURE patch (from Load Erasure Patch or the fit node)."),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-2.0,
                    max=2.0,
                    step=0.05,
                    tooltip="1 = remove the concept directions, 0 = off, between = partial, <0 = amplify.",
                ),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="A patched copy of the MODEL: sample with it.")],
        )

    @classmethod
    def execute(cls, model, patch, strength: float) -> io.NodeOutput:
        from ..patches.pure import apply_pure

        return io.NodeOutput(apply_pure(model, patch, strength))


NODES = [PureProject]
