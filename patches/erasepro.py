"""ErasePro on ComfyUI MODEL + CLIP: the fit the "Fit Concept Eraser" node calls.

1. Text stages (``erasure_core.erasepro.textstages``) on each encoder whose output the
   denoiser's K/V read (SD1.5: CLIP-L; SDXL: CLIP-L and CLIP-G; Flux: T5-XXL; Wan: umT5-XXL);
   the earlier stages are applied while capturing by encoding through a patched *clone*
   of the CLIP (``apply_weight_patch``), so the loaded CLIP is never touched.
2. The K/V stage (``kvstages``, ``alpha = 1``) on every cross-attention K and V of the MODEL
   (``families.kv_targets``), from the inputs ``patches.kv_inputs`` gives for the target
   prompts through the edited CLIP, the anchors through the original one and the retain
   prompts through the edited one; token rows aligned by ``align_pair``.
The result is one ``ErasurePatch`` with clip deltas (V projections) and model deltas (K/V).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from erasure_core.erasepro.fit import EraseProFit, kv_inputs_from_rows, to_patch
from erasure_core.erasepro.kvstages import KVWeight, solve_kv_stage
from erasure_core.erasepro.textstages import (
    SCHEDULES,
    AlignedTokens,
    EraseProConfig,
    TextStagesResult,
    fit_text_stages,
)
from erasure_core.errors import ErasureError
from erasure_core.metrics import cosine
from erasure_core.patch_file import ErasurePatch, WeightDelta
from erasure_core.progress import ProgressFn, noop_progress
from erasure_core.prompts import ConceptRequest, build_prompt_sets
from erasure_core.report import FitResult, figure_to_image, format_metrics, new_figure

from .apply import apply_weight_patch, effective_weight
from .clip_encoder import ComfyTextEncoder, available_encoders
from .families import detect_family, model_state_shapes
from .kv_inputs import kv_group, kv_inputs

log = logging.getLogger(__name__)

_D = EraseProConfig()
OPTIONS: dict[str, dict[str, Any]] = {
    "text_blocks": {
        "type": "combo",
        "default": "all",
        "options": ["all", "none", "first half", "second half"],
        "tooltip": "Text-encoder blocks whose value projection is edited before the cross-attention K/V.",
    },
    "schedule": {
        "type": "combo",
        "default": _D.schedule,
        "options": list(SCHEDULES),
        "tooltip": "How far each stage moves the target toward the anchor (linear: b/B, the last stage fully).",
    },
    "lam": {
        "type": "float",
        "default": _D.lam_rel,
        "min": 1e-8,
        "max": 10.0,
        "tooltip": "Regulariser relative to the retain activations: smaller keeps retain prompts closer.",
    },
    "tol": {
        "type": "float",
        "default": _D.tol,
        "min": 1e-8,
        "max": 0.5,
        "tooltip": "Drop target token directions weaker than tol x the strongest (makes the exact solve well posed).",
    },
    "max_templates": {
        "type": "int",
        "default": 0,
        "min": 0,
        "max": 100,
        "tooltip": "Use only the first N preset templates (0 = all).",
    },
    "kv_stage": {"type": "bool", "default": True, "tooltip": "Also edit every cross-attention K and V."},
}

#: encoders whose output the family's K/V read, in stage order; the last is the token reference
_KV_ENCODERS = {"sd15": ("clip_l",), "sdxl": ("clip_l", "clip_g"), "flux": ("t5xxl",)}


def _text_encoders(model: Any, clip: Any) -> list[str]:
    names = available_encoders(clip)
    if model is None:
        return names[-1:]
    family = detect_family(model).name
    wanted = _KV_ENCODERS.get(family, ("umt5xxl",))
    found = [n for n in wanted if n in names]
    if not found:
        raise ErasureError(f"this CLIP has {', '.join(names)}, but the MODEL reads {', '.join(wanted)}")
    return found


def _blocks(choice: str, n: int) -> tuple[int, ...] | None:
    return {"all": None, "none": (), "first half": tuple(range(n // 2)), "second half": tuple(range(n // 2, n))}[choice]


def _patched_clip(clip: Any, deltas: list[WeightDelta]) -> Any:
    if not deltas:
        return clip
    patch = ErasurePatch(method="erasepro", model_family="generic", deltas=tuple(deltas))
    return apply_weight_patch(None, clip, patch, 1.0)[1]


class _Edited:
    """``edited(deltas)`` for the text stages: an adapter over a patched clone of the CLIP."""

    def __init__(self, clip: Any, name: str, before: list[WeightDelta]) -> None:
        self.clip, self.name, self.before = clip, name, before

    @contextmanager
    def __call__(self, deltas: list[WeightDelta]) -> Iterator[ComfyTextEncoder]:
        yield ComfyTextEncoder(_patched_clip(self.clip, self.before + deltas), self.name)


def _cond(clip: Any, text: str, family: str) -> list:
    tokens = clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    if family == "flux":
        out["guidance"] = 3.5
    return [[cond, out]]


def _rows(inputs: list[dict[str, torch.Tensor]], group: str, lengths: list[int]) -> list[torch.Tensor]:
    """Per (prompt, step): the real rows ``(T_i, d_c)``."""
    return [x[:n] for d, n in zip(inputs, lengths) for x in d[group]]


def _repeat(tokens: AlignedTokens, steps: int) -> AlignedTokens:
    def rep(xs: list) -> list:
        return [x for x in xs for _ in range(steps)]

    return AlignedTokens(
        rep(tokens.target_prompts),
        rep(tokens.anchor_prompts),
        rep(tokens.target_rows),
        rep(tokens.anchor_rows),
        rep(tokens.free_rows),
        rep(tokens.target_ids),
        rep(tokens.anchor_ids),
    )


def draw_residuals(fit: EraseProFit, title: str) -> torch.Tensor:
    """Per-stage kept / total relative residuals and retain change (log scale)."""
    fig, ax = new_figure(7.0, 3.8)
    labels, kept, total, retain = [], [], [], []
    for s in fit.text.stages:
        labels.append(f"TE{s.block}\na={s.alpha:.2f}")
        kept.append(s.report.kept_residual)
        total.append(s.report.total_residual)
        retain.append(s.retain_change)
    if fit.kv is not None:
        labels.append("K/V\na=1")
        kept.append(fit.kv.max_kept_residual)
        total.append(max((r.total_residual for r in fit.kv.reports.values()), default=0.0))
        retain.append(fit.kv.max_retain_change)
    x = range(len(labels))
    floor = 1e-17
    ax.semilogy(x, [max(v, floor) for v in kept], "o-", label="kept residual (zero by construction)")
    ax.semilogy(x, [max(v, floor) for v in total], "s-", label="total residual (all target tokens)")
    ax.semilogy(x, [max(v, floor) for v in retain], "^-", label="retain change ||dW X_r|| / ||W X_r||")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return figure_to_image(fig)


def fit_erasepro(
    model: Any,
    clip: Any,
    request: ConceptRequest,
    *,
    seed: int = 0,
    progress: ProgressFn | None = None,
    text_blocks: str = "all",
    schedule: str = _D.schedule,
    lam: float = _D.lam_rel,
    tol: float = _D.tol,
    max_templates: int = 0,
    kv_stage: bool = True,
    steps: int = 2,
    latent_size: int = 256,
) -> FitResult:
    """Fit ErasePro on ``clip`` (text stages) and ``model`` (K/V stage); neither is modified."""
    if clip is None:
        raise ErasureError("ErasePro needs the CLIP (its prompts and text stages): connect a CLIP to the fit node")
    progress = progress or noop_progress
    if kv_stage and model is None:
        raise ErasureError("the K/V stage edits the MODEL: connect a MODEL, or turn kv_stage off")
    family = detect_family(model).name if model is not None else "generic"
    names = _text_encoders(model, clip)
    clip.load_model()
    text_deltas: list[WeightDelta] = []
    results: dict[str, TextStagesResult] = {}
    sets = build_prompt_sets(request, max_templates=max_templates or None)
    for name in names:
        enc = ComfyTextEncoder(clip, name)
        config = EraseProConfig(
            blocks=_blocks(text_blocks, enc.num_blocks),
            schedule=schedule,
            lam_rel=lam,
            tol=tol,
            max_templates=max_templates or None,
        )
        edited = _Edited(clip, name, list(text_deltas))
        res = fit_text_stages(
            enc, request, config=config, extra_stages=1 if kv_stage else 0, edited=edited, progress=progress, sets=sets
        )
        results[name] = res
        text_deltas.extend(res.deltas)
    ref_name = names[-1]
    ref = results[ref_name]
    kv = None
    base: dict[str, torch.Tensor] = {}
    clip_patches = clip.patcher.get_key_patches()
    for d in text_deltas:
        base[d.key] = clip_patches[d.key][0][0]
    if kv_stage:
        spec = detect_family(model)
        tokens = ref.tokens
        edited_clip = _patched_clip(clip, text_deltas)
        t_conds = [_cond(edited_clip, p, family) for p in tokens.target_prompts]
        a_conds = [_cond(clip, p, family) for p in tokens.anchor_prompts]
        r_conds = [_cond(edited_clip, p, family) for p in sets.retain]
        opts = {"steps": steps, "seed": seed, "latent_size": latent_size}
        t_in, a_in, r_in = (kv_inputs(model, cs, **opts) for cs in (t_conds, a_conds, r_conds))
        ref_enc = ComfyTextEncoder(clip, ref_name)
        t_len = [len(i) for i in tokens.target_ids]
        a_len = [len(i) for i in tokens.anchor_ids]
        r_len = [len(ref_enc.tokenize(p)) for p in sets.retain]
        targets = spec.kv_targets(model_state_shapes(model), model)
        groups = {kv_group(spec, t.layer) for t in targets}
        inputs = {}
        for g in sorted(groups):
            n_steps = t_in[0][g].shape[0]
            inputs[g] = kv_inputs_from_rows(
                _repeat(tokens, n_steps), _rows(t_in, g, t_len), _rows(a_in, g, a_len), _rows(r_in, g, r_len)
            )
        weights = []
        for t in targets:
            W = effective_weight(model, t.key)
            base[t.key] = model.get_key_patches()[t.key][0][0]
            if t.offset is not None:
                W = W.narrow(t.offset[0], t.offset[1], t.offset[2])
            weights.append(KVWeight(t.key, W, kv_group(spec, t.layer), t.offset, t.lora_name))
        kv = solve_kv_stage(weights, inputs, alpha=1.0, lam_rel=lam, tol=tol)
    fit = EraseProFit(ref, kv)
    fit_all = {n: EraseProFit(r, None).metrics()["stages"] for n, r in results.items()}
    fit_config = {
        "text_blocks": text_blocks,
        "schedule": schedule,
        "lam": lam,
        "tol": tol,
        "max_templates": max_templates,
        "kv_stage": kv_stage,
        "steps": steps,
        "latent_size": latent_size,
        "encoders": names,
    }
    patch = to_patch(fit, request, model_family=family, fit_config=fit_config, base_weights=base)
    patch = ErasurePatch(
        method="erasepro",
        model_family=family,
        deltas=tuple(text_deltas) + (tuple(kv.deltas) if kv is not None else ()),
        concept=patch.concept,
        fit_config=fit_config,
        fingerprint=patch.fingerprint,
        metrics=dict(patch.metrics, stages_per_encoder=fit_all, **_retain(clip, patch, names, sets.retain)),
    )
    image = draw_residuals(fit, f"ErasePro on {', '.join(names)}" + (" + K/V" if kv is not None else ""))
    summary = "ErasePro: " + format_metrics(
        {k: v for k, v in patch.metrics.items() if k in ("residual", "kv_max_retain_change", "retain_drift")}
    )
    return FitResult(patch, image, summary, {"fit": fit, "text": results})


def _retain(clip: Any, patch: ErasurePatch, names: list[str], retain: tuple[str, ...]) -> dict[str, float]:
    """Retain drift ``1 - cos`` of the final conditioning of each encoder, with the text deltas applied."""
    if not patch.clip_deltas():
        return {"retain_drift": 0.0}
    edited = _patched_clip(clip, patch.clip_deltas())
    drift = 0.0
    for name in names:
        before = [e.output for e in ComfyTextEncoder(clip, name).encode(list(retain))]
        after = [e.output for e in ComfyTextEncoder(edited, name).encode(list(retain))]
        drift = max([drift] + [1 - cosine(a, b) for a, b in zip(after, before)])
    return {"retain_drift": drift}
