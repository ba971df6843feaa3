"""The demo's text-encoder methods on the real pretrained MiniLM: CLEAR, HiRM-S, ErasePro's text stages.

Each method is fitted through its own entry point (``clear.fit.fit_clear``, ``hirm.fit.fit_hirm``,
``erasepro.fit.fit_headless``), turned into an ``ErasurePatch``, written, and measured with
``evaluate.evaluate_encoder_patch`` on the encoder's final output (mean-pooled over tokens):
leakage of the fitted forget prompts and of the held-out templates, retain cosine.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..adapters.base import TextEncoderAdapter
from ..evaluate import evaluate_encoder_patch
from ..metrics import ConditioningReport
from ..patch_file import ErasurePatch
from ..progress import tqdm_progress
from ..prompts import ConceptRequest, PromptSets
from .common import SEED, DemoRow, DemoSettings, save_patch, timed

log = logging.getLogger(__name__)

WHERE = "MiniLM output"


def _row(method: str, report: ConditioningReport, notes: str, path: Path | None, seconds: float) -> DemoRow:
    return DemoRow.from_report(method, WHERE, report, notes, path, seconds)


def baseline_row(encoder: TextEncoderAdapter, request: ConceptRequest, sets: PromptSets) -> DemoRow:
    """The unedited encoder: leakage and retain cosine 1 by definition, cosine to the anchor as it is."""
    empty = ErasurePatch("clear", "hf", concept=request.to_dict())
    return _row("(no edit)", evaluate_encoder_patch(empty, encoder, sets=sets), "before", None, 0.0)


def clear_rows(
    encoder: TextEncoderAdapter, request: ConceptRequest, settings: DemoSettings, out_dir: Path
) -> list[DemoRow]:
    """CLEAR (one SAE module at the block the search picks), measured at strength 1 and 2."""
    from ..clear.fit import config_dict, fit_clear, to_patch
    from ..clear.search import ClearConfig

    overrides = {
        "search_steps": settings.clear_search_steps,
        "finetune_steps": settings.clear_finetune_steps,
        "background": settings.clear_background,
    }
    config = ClearConfig(**{k: v for k, v in overrides.items() if v is not None})
    with timed() as t, tqdm_progress("CLEAR fit (MiniLM)") as progress:
        fit = fit_clear(encoder, request, config=config, seed=SEED, progress=progress)
    unmeasured = to_patch(fit, encoder, request, model_family="hf", fit_config=config_dict(config), report=None)
    report = evaluate_encoder_patch(unmeasured, encoder, sets=fit.sets)
    patch = to_patch(fit, encoder, request, model_family="hf", fit_config=config_dict(config), report=report)
    path = save_patch(patch, out_dir, "clear_van_gogh.safetensors")
    tf = fit.targets[0]
    notes = f"block {tf.module.block}, {tf.num_specific} specific features"
    rows = [_row("CLEAR (strength 1)", report, notes, path, t[0])]
    strong = evaluate_encoder_patch(patch, encoder, strength=2.0, sets=fit.sets)
    rows.append(_row("CLEAR (strength 2)", strong, "same file, applied at 2", path, 0.0))
    return rows


def hirm_row(encoder: TextEncoderAdapter, request: ConceptRequest, settings: DemoSettings, out_dir: Path) -> DemoRow:
    """HiRM-S (the default variant): block 0 trained so the last block maps the target onto the anchor's rows."""
    from ..hirm.fit import HirmConfig, fit_hirm, to_patch

    base = {k: w.detach() for k, w in encoder.root.named_parameters()}
    config = HirmConfig(variant="S", epochs=settings.hirm_epochs)
    with timed() as t, tqdm_progress("HiRM-S fit (MiniLM)") as progress:
        fit = fit_hirm(encoder, request, config=config, seed=SEED, progress=progress)
    unmeasured = to_patch(fit, request, config=config, model_family="hf", base_weights=base)
    report = evaluate_encoder_patch(unmeasured, encoder)
    metrics = dict(report.as_dict(), retain_drift=report.retain_drift_max)
    patch = to_patch(fit, request, config=config, model_family="hf", base_weights=base, metrics=metrics)
    path = save_patch(patch, out_dir, "hirm_van_gogh.safetensors")
    notes = f"loss -{100 * fit.loss_drop:.0f}% in {fit.epochs} epochs"
    return _row("HiRM-S", report, notes, path, t[0])


def erasepro_text_row(encoder: TextEncoderAdapter, request: ConceptRequest, out_dir: Path) -> DemoRow:
    """ErasePro's text-encoder stages alone (every block's V projection, alpha 1/6 .. 1)."""
    from ..erasepro.fit import fit_headless, to_patch
    from ..erasepro.textstages import EraseProConfig

    config = EraseProConfig()
    with timed() as t, tqdm_progress("ErasePro text stages (MiniLM)") as progress:
        fit = fit_headless(encoder, request, config=config, progress=progress)
    params = dict(encoder.root.named_parameters())
    base = {d.key: params[d.key].detach() for d in fit.text.deltas}
    fit_config = dict(config.as_dict(), encoder=encoder.name, kv_weights=False)
    unmeasured = to_patch(fit, request, model_family="hf", fit_config=fit_config, base_weights=base)
    report = evaluate_encoder_patch(unmeasured, encoder, sets=fit.text.sets)
    patch = to_patch(
        fit, request, model_family="hf", fit_config=fit_config, base_weights=base, metrics=report.as_dict()
    )
    path = save_patch(patch, out_dir, "erasepro_text_van_gogh.safetensors")
    m = fit.metrics()
    notes = f"{len(fit.text.stages)} stages, residual {m['residual']:.0e}"
    return _row("ErasePro (text stages)", report, notes, path, t[0])
