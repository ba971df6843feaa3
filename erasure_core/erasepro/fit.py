"""ErasePro end to end on a headless encoder: text stages, then (optionally) a K/V stage, then the patch.

The K/V stage's inputs are the encoder's output (what a denoiser without its own text
projection reads): target prompts through the edited encoder, anchors through the
original one, retain prompts through the edited one, aligned with the text stages'
token rows. ``kv_weights`` (``{key: (d_out, d_c)}``) are e.g. read from a plain
safetensors file of a denoiser's K/V weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters.base import TextEncoderAdapter
from ..errors import FitError
from ..patch_file import ErasurePatch, weight_fingerprint
from ..progress import ProgressFn, noop_progress
from ..prompts import ConceptRequest
from .kvstages import KVInputs, KVStageResult, KVWeight, solve_kv_stage
from .textstages import AlignedTokens, EditedFn, EraseProConfig, TextStagesResult, fit_text_stages, headless_edited

log = logging.getLogger(__name__)


def kv_inputs_from_rows(
    tokens: AlignedTokens,
    target_rows: Sequence[torch.Tensor],
    anchor_rows: Sequence[torch.Tensor],
    retain_rows: Sequence[torch.Tensor] = (),
) -> KVInputs:
    """``KVInputs`` from per-prompt ``(T_i, d_c)`` rows, selecting the aligned constrained tokens.

    ``retain_rows``: all their rows count, plus the free (pre-concept) rows of the targets.
    """
    X_t = torch.cat([x[i.to(x.device)] for x, i in zip(target_rows, tokens.target_rows)]).T
    X_a = torch.cat([x[i.to(x.device)] for x, i in zip(anchor_rows, tokens.anchor_rows)]).T.to(X_t.device)
    extra = [x[i.to(x.device)] for x, i in zip(target_rows, tokens.free_rows)]
    parts = [r.to(X_t.device) for r in [*retain_rows, *extra] if r.shape[0]]
    return KVInputs(X_t.float(), X_a.float(), torch.cat(parts).T.float() if parts else None)


@dataclass
class EraseProFit:
    """Text stages and the K/V stage (``None`` without K/V weights)."""

    text: TextStagesResult
    kv: KVStageResult | None

    def metrics(self) -> dict[str, Any]:
        """Per-stage residuals and retain changes, and the final relative residual."""
        m: dict[str, Any] = {
            "stages": [
                {
                    "block": s.block,
                    "alpha": round(s.alpha, 6),
                    "kept_residual": s.report.kept_residual,
                    "total_residual": s.report.total_residual,
                    "energy_outside": s.report.energy_outside,
                    "kept": s.report.kept,
                    "columns": s.report.columns,
                    "retain_change": s.retain_change,
                    "delta_norm": s.delta_norm,
                }
                for s in self.text.stages
            ]
        }
        if self.kv is not None:
            m["kv_max_kept_residual"] = self.kv.max_kept_residual
            m["kv_max_total_residual"] = max((r.total_residual for r in self.kv.reports.values()), default=0.0)
            m["kv_max_retain_change"] = self.kv.max_retain_change
            m["kv_energy_outside"] = max((r.energy_outside for r in self.kv.reports.values()), default=0.0)
            m["residual"] = m["kv_max_kept_residual"]
        elif self.text.stages:
            m["residual"] = self.text.stages[-1].report.kept_residual
        if self.text.stages:
            m["text_max_retain_change"] = max(s.retain_change for s in self.text.stages)
        return m


def fit_headless(
    adapter: TextEncoderAdapter,
    request: ConceptRequest,
    *,
    config: EraseProConfig = EraseProConfig(),
    kv_weights: dict[str, torch.Tensor] | None = None,
    edited: EditedFn | None = None,
    progress: ProgressFn | None = None,
) -> EraseProFit:
    """Text stages on ``adapter``; with ``kv_weights``, a final K/V stage reading the encoder output."""
    progress = progress or noop_progress
    kv_weights = kv_weights or {}
    text = fit_text_stages(adapter, request, config=config, extra_stages=1 if kv_weights else 0, progress=progress)
    if not kv_weights:
        if not text.stages:
            raise FitError("nothing to edit: no text-encoder blocks chosen and no K/V weights given")
        return EraseProFit(text, None)
    d_c = adapter.encode([text.tokens.target_prompts[0]])[0].output.shape[-1]
    for key, W in kv_weights.items():
        if W.ndim != 2 or W.shape[1] != d_c:
            raise FitError(
                f"K/V weight {key!r} has shape {tuple(W.shape)}, but the encoder output has width {d_c}: "
                "the weights must read this encoder's output (d_out, d_c)"
            )
    edited = edited or (lambda deltas: headless_edited(adapter, deltas))
    anchors = [e.output for e in adapter.encode(text.tokens.anchor_prompts)]
    with edited(text.deltas) as now:
        targets = [e.output for e in now.encode(text.tokens.target_prompts)]
        retain = [e.output for e in now.encode(list(text.sets.retain))]
    inputs = {"output": kv_inputs_from_rows(text.tokens, targets, anchors, retain)}
    weights = [KVWeight(k, W.detach().float(), "output") for k, W in kv_weights.items()]
    kv = solve_kv_stage(weights, inputs, alpha=1.0, lam_rel=config.lam_rel, tol=config.tol, progress=progress)
    return EraseProFit(text, kv)


def to_patch(
    fit: EraseProFit,
    request: ConceptRequest,
    *,
    model_family: str,
    fit_config: dict[str, Any],
    base_weights: dict[str, torch.Tensor],
    metrics: dict[str, Any] | None = None,
) -> ErasurePatch:
    """The ``ErasurePatch`` of a fit (``base_weights``: ``{key: weight}`` of the edited keys, for fingerprints)."""
    deltas = list(fit.text.deltas) + (list(fit.kv.deltas) if fit.kv is not None else [])
    return ErasurePatch(
        method="erasepro",
        model_family=model_family,
        deltas=tuple(deltas),
        concept=request.to_dict(),
        fit_config=fit_config,
        fingerprint={k: weight_fingerprint(w) for k, w in base_weights.items()},
        metrics=dict(fit.metrics(), **(metrics or {})),
    )
