"""The demo's K/V methods: PURE and ErasePro's K/V stage on random cross-attention layers shaped like SD1.5's.

The stack (``pure.synthetic.SyntheticStack``, ``SD15_WIDTHS``: 16 layers, 320-1280 wide, random
``W_k``, ``W_v`` of shape ``(w, 384)``) reads the real MiniLM's 384-wide output ``c`` (``(T, 384)``)
directly, as SD1.5's layers read CLIP's. What is measured, per K/V weight ``W`` (``W' = W + Delta``)
and then averaged over the 32 weights::

    forget / held-out leakage  = metrics.leakage(W' c_t', W c_t, W c_a)     pooled over tokens
    retain cosine              = cos(pool(W' c_r'), pool(W c_r))
    retain change              = ||W' c_r' - W c_r|| / ||W c_r||            (all retain tokens)

with ``c_t``, ``c_a``, ``c_r`` the original encoder's outputs of forget, anchor and retain prompts
and ``c'`` the outputs through the text-edited encoder (ErasePro's text stages; PURE leaves the
encoder alone, ``c' = c``). PURE fits on read vectors ``R = A c`` of random image queries
(``SyntheticStack.reads``), since no denoiser runs here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from ..adapters.base import TextEncoderAdapter
from ..apply import applied_deltas
from ..metrics import ConditioningReport, conditioning_report
from ..patch_file import ErasurePatch, WeightDelta, make_delta, weight_fingerprint
from ..progress import tqdm_progress
from ..prompts import ConceptRequest, PromptSets
from ..pure import PureFitter, SyntheticStack
from ..pure.synthetic import SD15_WIDTHS
from .common import SEED, DemoRow, DemoSettings, save_patch, timed

log = logging.getLogger(__name__)

WHERE = "K/V, 16 SD1.5-shaped layers"

Weights = dict[str, tuple[str, torch.Tensor]]


def build_stack(d_c: int) -> SyntheticStack:
    """Random-weight cross-attention layers at SD1.5's widths reading a ``d_c``-wide conditioning."""
    return SyntheticStack.build(SD15_WIDTHS, d_c, seed=SEED)


def _outputs(encoder: TextEncoderAdapter, prompts: Sequence[str]) -> list[torch.Tensor]:
    return [e.output.float() for e in encoder.encode(list(prompts))]


@torch.no_grad()
def kv_report(
    encoder: TextEncoderAdapter,
    weights: Weights,
    patch: ErasurePatch,
    sets: PromptSets,
) -> tuple[ConditioningReport, float, float]:
    """The K/V numbers of ``patch`` (module docstring): the mean report over weights, mean and max retain change."""
    groups = {
        "f": [p.target_prompt for p in sets.pairs],
        "fa": [p.anchor_prompt for p in sets.pairs],
        "h": [p.target_prompt for p in sets.holdout_pairs],
        "ha": [p.anchor_prompt for p in sets.holdout_pairs],
        "r": list(sets.retain),
    }
    before = {k: _outputs(encoder, v) for k, v in groups.items()}
    clip = [d for d in patch.clip_deltas() if d.key.startswith(encoder.key_prefix)]
    ctx = applied_deltas(encoder.root, clip, key_prefix=encoder.key_prefix) if clip else nullcontext()
    with ctx:
        after = {k: _outputs(encoder, groups[k]) for k in ("f", "h", "r")}
    model = {d.key: d.delta() for d in patch.model_deltas()}
    reports, changes = [], []
    for key, (_, W) in weights.items():
        W = W.float()
        Wn = W + model[key] if key in model else W

        def kv(xs: list[torch.Tensor], M: torch.Tensor) -> list[torch.Tensor]:
            return [x @ M.T for x in xs]

        o = {k: kv(v, W) for k, v in before.items()}
        e = {k: kv(v, Wn) for k, v in after.items()}
        reports.append(
            conditioning_report(
                list(zip(e["f"], o["f"], o["fa"])), list(zip(e["h"], o["h"], o["ha"])), list(zip(e["r"], o["r"]))
            )
        )
        r_o, r_e = torch.cat(o["r"]), torch.cat(e["r"])
        changes.append(float(torch.linalg.norm(r_e - r_o) / torch.linalg.norm(r_o).clamp_min(1e-30)))
    mean = ConditioningReport(
        **{f: sum(getattr(r, f) for r in reports) / len(reports) for f in ConditioningReport.__dataclass_fields__}
    )
    return mean, sum(changes) / len(changes), max(changes)


def _row(method: str, report: ConditioningReport, notes: str, path: Path | None, seconds: float) -> DemoRow:
    return DemoRow.from_report(method, WHERE, report, notes, path, seconds)


def baseline_row(encoder: TextEncoderAdapter, weights: Weights, request: ConceptRequest, sets: PromptSets) -> DemoRow:
    """The unedited layers (cosine of the forget K/V outputs to the anchor's, as they are)."""
    report, _, _ = kv_report(encoder, weights, ErasurePatch("pure", "hf", concept=request.to_dict()), sets)
    return _row("(no edit)", report, "before", None, 0.0)


def pure_row(
    encoder: TextEncoderAdapter,
    stack: SyntheticStack,
    request: ConceptRequest,
    sets: PromptSets,
    settings: DemoSettings,
    out_dir: Path,
) -> DemoRow:
    """PURE with the anchor variant: reads of retain, forget and anchor prompts -> bases -> K/V deltas."""
    forget = [p.target_prompt for p in sets.pairs] + list(sets.extra_forget)
    anchors = [p.anchor_prompt for p in sets.pairs]
    retain = list(sets.retain)
    jobs = [("retain", p) for p in retain] + [("forget", p) for p in forget] + [("anchor", p) for p in anchors]
    fitter = PureFitter(stack.dims, seed=SEED)
    with timed() as t, tqdm_progress("PURE fit (K/V)") as progress:
        total = len(jobs) + 1
        for i, (kind, prompt) in enumerate(jobs):
            c = _outputs(encoder, [prompt])[0]
            for s in range(settings.read_seeds):
                reads = stack.reads(c, queries=settings.queries, seed=SEED + 1000 * s + i)
                for layer, R in reads.items():
                    if kind == "anchor":
                        fitter.update_anchor(layer, R)
                    else:
                        fitter.update(layer, R, forget=kind == "forget")
            progress(i + 1, total)
        eraser = fitter.solve()
        progress(total, total)
    weights = stack.weights()
    deltas: list[WeightDelta] = []
    for key, (layer, W) in weights.items():
        if eraser.rank(layer):
            up, down = eraser.delta(layer, W)
            deltas.append(make_delta(key, "model", up, down))
    ranks = [eraser.rank(layer) for layer in eraser.layers]
    energy = sum(eraser.energy.values()) / max(len(eraser.energy), 1)
    config = {"rank": fitter.rank, "threshold": fitter.threshold, "queries": settings.queries, "seed": SEED}
    config.update(read_seeds=settings.read_seeds, stack="synthetic SD1.5 widths, random weights", d_c=stack.d_c)
    patch = ErasurePatch(
        "pure",
        "hf",
        tuple(deltas),
        concept=request.to_dict(),
        fit_config=config,
        fingerprint={d.key: weight_fingerprint(weights[d.key][1]) for d in deltas},
    )
    report, change, change_max = kv_report(encoder, weights, patch, sets)
    metrics = dict(report.as_dict(), rank_min=min(ranks), rank_max=max(ranks))
    metrics.update(forget_energy_removed_mean=round(energy, 6), retain_kv_change_mean=round(change, 6))
    metrics.update(retain_kv_change_max=round(change_max, 6))
    patch = ErasurePatch(
        "pure", "hf", patch.deltas, patch.clear_modules, patch.concept, config, patch.fingerprint, metrics
    )
    path = save_patch(patch, out_dir, "pure_van_gogh.safetensors")
    notes = f"rank {min(ranks)}-{max(ranks)}, read energy removed {energy:.2f}, retain change {change:.1e}"
    return _row("PURE (anchor)", report, notes, path, t[0])


def erasepro_kv_row(
    encoder: TextEncoderAdapter, stack: SyntheticStack, request: ConceptRequest, out_dir: Path
) -> DemoRow:
    """ErasePro's full chain: the text stages (alpha 1/7 .. 6/7) then the joint K/V stage (alpha 1)."""
    from ..erasepro.fit import fit_headless, to_patch
    from ..erasepro.textstages import EraseProConfig

    config = EraseProConfig()
    weights = stack.weights()
    kv = {key: W for key, (_, W) in weights.items()}
    with timed() as t, tqdm_progress("ErasePro text + K/V stages") as progress:
        fit = fit_headless(encoder, request, config=config, kv_weights=kv, progress=progress)
    params = dict(encoder.root.named_parameters())
    base = {d.key: params[d.key].detach() for d in fit.text.deltas}
    base.update(kv)
    fit_config = dict(config.as_dict(), encoder=encoder.name, kv_weights=True, stack="synthetic SD1.5 widths")
    unmeasured = to_patch(fit, request, model_family="hf", fit_config=fit_config, base_weights=base)
    report, change, change_max = kv_report(encoder, weights, unmeasured, fit.text.sets)
    metrics = dict(report.as_dict(), retain_kv_change_mean=round(change, 6), retain_kv_change_max=round(change_max, 6))
    patch = to_patch(fit, request, model_family="hf", fit_config=fit_config, base_weights=base, metrics=metrics)
    path = save_patch(patch, out_dir, "erasepro_kv_van_gogh.safetensors")
    m = fit.metrics()
    notes = f"{len(fit.text.stages)}+1 stages, K/V residual {m['kv_max_kept_residual']:.0e}, retain change {change:.1e}"
    return _row("ErasePro (text + K/V)", report, notes, path, t[0])
