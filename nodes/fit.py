"""Node "Fit Concept Eraser": fit CLEAR, PURE, HiRM or ErasePro on the user's own MODEL/CLIP inside ComfyUI."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, NODE_PREFIX, ErasurePatchType

METHOD_NAMES = ["CLEAR", "PURE", "HiRM", "ErasePro"]
PRESETS = ["object", "style", "celebrity", "nudity"]
ENCODER_NAMES = ["auto", "clip_l", "clip_g", "t5xxl", "umt5xxl"]


class FitEraser(io.ComfyNode):
    """MODEL/CLIP + concept request + main options -> ERASURE_PATCH, report IMAGE, summary STRING."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}Fit",
            display_name="Fit Concept Eraser",
            category=f"{CATEGORY}/fit",
            description=(
                "Fit an eraser for one or more concepts on the connected model. CLEAR and HiRM need only the CLIP; "
                "PURE needs the MODEL and CLIP; ErasePro edits both. Outputs the patch (apply it, or save it with "
                "Save Erasure Patch), the method's report picture and a summary with the measured leakage and "
                "retain numbers. Progress shows on the node; Cancel stops the fit and nothing is written."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="The diffusion model (needed by PURE and ErasePro's K/V stage; also records the model "
                    "family so the patch is refused on other models).",
                ),
                io.Clip.Input("clip", optional=True, tooltip="The text encoder of the same model (all methods)."),
                io.Combo.Input(
                    "method",
                    options=METHOD_NAMES,
                    default="CLEAR",
                    tooltip="CLEAR: learn the text-encoder block and sparse features of the concept, subtract them. "
                    "PURE: project the concept out of cross-attention K/V. HiRM: retrain the first text-encoder block. "
                    "ErasePro: exact closed-form edits, shallow to deep.",
                ),
                io.String.Input(
                    "targets",
                    multiline=True,
                    default="Van Gogh",
                    tooltip="Concepts to erase, one per line (e.g. an artist, a character, an object). May be empty "
                    "with the nudity preset.",
                ),
                io.String.Input(
                    "anchor",
                    default="",
                    tooltip="What the targets should become (e.g. 'a painting'); empty = nothing (remove them).",
                ),
                io.String.Input(
                    "retain",
                    multiline=True,
                    default="",
                    tooltip="Concepts that must not change, one per line; empty = the preset's list.",
                ),
                io.Combo.Input(
                    "preset",
                    options=PRESETS,
                    default="style",
                    tooltip="Prompt templates and default retain concepts for this kind of concept.",
                ),
                io.String.Input(
                    "paraphrases",
                    multiline=True,
                    default="",
                    tooltip="Optional prompts that evoke a target without naming it, one per line (erased too).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFF,
                    control_after_generate=False,
                    tooltip="Random seed of the fit (same inputs and seed = same patch).",
                ),
                io.Int.Input(
                    "steps",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip="0 = the method's default. CLEAR: layer-search steps; HiRM: epochs; PURE and ErasePro: "
                    "denoising steps of the activation capture.",
                ),
                io.Int.Input(
                    "rank",
                    default=0,
                    min=0,
                    max=1024,
                    tooltip="0 = the method's default. PURE: directions removed per layer; HiRM: SVD rank of the "
                    "stored update (0 = exact). Ignored by CLEAR and ErasePro.",
                ),
                io.Float.Input(
                    "gamma",
                    default=1.0,
                    min=0.0,
                    max=5.0,
                    step=0.05,
                    tooltip="CLEAR: default strength stored in the patch. Ignored by the other methods (use the "
                    "strength of the apply nodes).",
                ),
                io.Combo.Input(
                    "encoder",
                    options=ENCODER_NAMES,
                    default="auto",
                    tooltip="Text encoder to work in (CLEAR, HiRM). auto: umT5 for Wan, T5 for Flux, CLIP-G for "
                    "SDXL, CLIP-L for SD1.5 (HiRM: every encoder).",
                ),
                io.String.Input(
                    "advanced",
                    multiline=True,
                    default="",
                    tooltip="Further method options, one name=value per line (or a JSON object), e.g. "
                    "finetune_steps=100 for CLEAR, variant=R for HiRM, lam=0.01 for ErasePro. Unknown names are "
                    "refused with the list of valid ones.",
                ),
            ],
            outputs=[
                ErasurePatchType.Output(
                    display_name="patch",
                    tooltip="The fitted eraser: apply it, or keep it with Save Erasure Patch.",
                ),
                io.Image.Output(display_name="report", tooltip="The method's report picture."),
                io.String.Output(display_name="summary", tooltip="What was fitted and the measured numbers."),
            ],
        )

    @classmethod
    def execute(
        cls,
        method: str,
        targets: str,
        anchor: str,
        retain: str,
        preset: str,
        paraphrases: str,
        seed: int,
        steps: int,
        rank: int,
        gamma: float,
        encoder: str,
        advanced: str,
        model=None,
        clip=None,
    ) -> io.NodeOutput:
        import torch

        from ..patches.fit import concept_request, fit_concept, main_options, parse_advanced

        request = concept_request(targets, anchor, retain, preset, paraphrases)
        options = main_options(method, steps=steps, rank=rank, gamma=gamma, encoder=encoder)
        options.update(parse_advanced(method, advanced))
        result = fit_concept(method, model, clip, request, seed=seed, options=options)
        image = result.image if result.image is not None else torch.zeros(64, 64, 3)
        if image.ndim == 3:
            image = image.unsqueeze(0)
        return io.NodeOutput(result.patch, image.float().clamp(0, 1).cpu(), result.summary)


NODES = [FitEraser]
