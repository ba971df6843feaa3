"""Before/after numbers of a text-encoder patch on a headless encoder.

For the prompt sets of the patch's concept request: the encoder's final output for
forget, held-out and retain prompts, without and with the patch (its ``clip`` weight
deltas added to the encoder's weights, its CLEAR modules hooked at their blocks),
summarised by ``metrics.conditioning_report``.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from .adapters.base import TextEncoderAdapter
from .apply import applied_deltas
from .metrics import ConditioningReport, conditioning_report
from .patch_file import ErasurePatch
from .prompts import ConceptRequest, PromptSets, build_prompt_sets


def request_of(patch: ErasurePatch) -> ConceptRequest:
    """The concept request a patch was fitted for (from its metadata)."""
    c = patch.concept
    return ConceptRequest.create(
        c.get("targets", []),
        anchor=c.get("anchor", ""),
        retain=c.get("retain") or None,
        preset=c.get("preset", "object"),
        prompts=c.get("prompts"),
        paraphrases=c.get("paraphrases"),
    )


def _outputs(adapter: TextEncoderAdapter, prompts: list[str]) -> list[torch.Tensor]:
    return [e.output for e in adapter.encode(prompts)]


@torch.no_grad()
def evaluate_encoder_patch(
    patch: ErasurePatch, adapter: TextEncoderAdapter, *, strength: float = 1.0, sets: PromptSets | None = None
) -> ConditioningReport:
    """Leakage of forget and held-out prompts, retain similarity, for ``patch`` on ``adapter``."""
    sets = sets or build_prompt_sets(request_of(patch))
    forget_p, forget_a = [p.target_prompt for p in sets.pairs], [p.anchor_prompt for p in sets.pairs]
    hold_p, hold_a = [p.target_prompt for p in sets.holdout_pairs], [p.anchor_prompt for p in sets.holdout_pairs]
    retain = list(sets.retain)
    before = {
        k: _outputs(adapter, v)
        for k, v in {"f": forget_p, "fa": forget_a, "h": hold_p, "ha": hold_a, "r": retain}.items()
    }
    with ExitStack() as stack:
        deltas = [d for d in patch.clip_deltas() if d.key.startswith(adapter.key_prefix)]
        stack.enter_context(applied_deltas(adapter.root, deltas, strength=strength, key_prefix=adapter.key_prefix))
        modules = [m for m in patch.clear_modules if m.encoder in (adapter.name, "*")] or list(patch.clear_modules)
        if modules:
            from .clear.intervention import intervened

            stack.enter_context(intervened(adapter, modules, gamma=strength))
        after = {k: _outputs(adapter, v) for k, v in {"f": forget_p, "h": hold_p, "r": retain}.items()}
    return conditioning_report(
        list(zip(after["f"], before["f"], before["fa"])),
        list(zip(after["h"], before["h"], before["ha"])),
        list(zip(after["r"], before["r"])),
    )
