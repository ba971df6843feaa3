"""HiRM on ComfyUI CLIP objects: the fit the "Fit Concept Eraser" node calls.

Each chosen encoder of the CLIP (SD1.5: CLIP-L; SDXL: CLIP-L and CLIP-G; Flux: T5-XXL
and/or CLIP-L; Wan: umT5-XXL) gets its block 0 trained by ``erasure_core.hirm`` through a
``ComfyForward``: ``torch.func.functional_call`` on the encoder's ``SDClipModel`` with the
padded token lists the CLIP's tokenizer produced (COMFYUI.md §3.5: it runs under
ComfyUI's inference mode with fp16/bf16/fp32 weights). The loaded CLIP is never
modified; the result is a patch of ``("diff", (delta,))`` entries applied to a clone by
``patches.apply.apply_weight_patch`` (exportable as ``text_encoders.<key>.diff``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from erasure_core.errors import ErasureError
from erasure_core.hirm.fit import HirmConfig, HirmFit, draw_loss, to_patch
from erasure_core.hirm.fit import fit_hirm as core_fit_hirm
from erasure_core.metrics import conditioning_report
from erasure_core.progress import ProgressFn, noop_progress
from erasure_core.prompts import ConceptRequest, build_prompt_sets
from erasure_core.report import FitResult, format_metrics

from .apply import apply_weight_patch
from .clip_encoder import ENCODERS, ComfyTextEncoder, available_encoders
from .families import detect_family

log = logging.getLogger(__name__)

OPTIONS: dict[str, dict[str, Any]] = {
    "variant": {
        "type": "combo",
        "default": "S",
        "options": ["S", "R"],
        "tooltip": "S: move the concept toward a broader concept (cleaner). R: toward random directions (stronger).",
    },
    "encoder": {
        "type": "combo",
        "default": "auto",
        "options": ["auto", *ENCODERS],
        "tooltip": "Text encoder whose first block is trained. auto: every encoder of this CLIP.",
    },
    "epochs": {
        "type": "int",
        "default": 0,
        "min": 0,
        "max": 10000,
        "tooltip": "Training epochs; 0 = the preset's (style 40/30, object 25/15, nudity 50/25 for R/S).",
    },
    "lr": {
        "type": "float",
        "default": 0.0,
        "min": 0.0,
        "max": 1.0,
        "tooltip": "Adam learning rate; 0 = the preset's (5e-5, nudity 1e-4).",
    },
}


class ComfyForward:
    """``ForwardSpec`` of one ComfyUI encoder: its ``SDClipModel`` on padded token-id lists."""

    param_prefix = "transformer."

    def __init__(self, enc: ComfyTextEncoder) -> None:
        self.enc = enc
        self.module = enc.wrapper

    def inputs(self, prompts: Sequence[str]) -> tuple[tuple, dict[str, Any], torch.Tensor]:
        lists, lengths = [], []
        for p in prompts:
            pairs = self.enc.clip.tokenize(p)[self.enc.token_key][0]
            lists.append([int(t[0]) for t in pairs])
            lengths.append(self.enc._real_length(pairs))
        width = max(len(x) for x in lists)
        pad = getattr(self.enc._tokenizer(), "pad_token", 0) or 0
        lists = [x + [pad] * (width - len(x)) for x in lists]
        mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        return (lists,), {}, mask


class _ComfyEncoder(ComfyTextEncoder):
    def forward_spec(self) -> ComfyForward:
        return ComfyForward(self)


def _encoders(clip: Any, encoder: str) -> list[str]:
    names = available_encoders(clip)
    if encoder in ("auto", "", None):
        return names
    if encoder not in names:
        raise ErasureError(f"this CLIP has no {encoder!r} encoder (it has {', '.join(names)}); choose one of those")
    return [encoder]


def _outputs(clip: Any, name: str, prompts: Sequence[str]) -> list[torch.Tensor]:
    return [e.output for e in ComfyTextEncoder(clip, name).encode(prompts)]


def fit_hirm(
    model: Any,
    clip: Any,
    request: ConceptRequest,
    *,
    seed: int = 0,
    progress: ProgressFn | None = None,
    variant: str = "S",
    superordinate: str = "",
    encoder: str = "auto",
    epochs: int = 0,
    lr: float = 0.0,
    c: float | None = None,
    compress_rank: int = 0,
) -> FitResult:
    """Fit HiRM on block 0 of each chosen encoder of ``clip`` (``model``/``clip`` are not modified)."""
    if clip is None:
        raise ErasureError("HiRM edits the text encoder: connect a CLIP to the fit node")
    progress = progress or noop_progress
    config = HirmConfig(
        variant=variant,
        epochs=epochs or None,
        lr=lr or None,
        c=c,
        superordinate=superordinate or None,
        compress_rank=compress_rank,
    )
    names = _encoders(clip, encoder)
    clip.load_model()
    fits: dict[str, HirmFit] = {}
    deltas, base = [], {}
    for i, name in enumerate(names):
        enc = _ComfyEncoder(clip, name)

        def step(done: int, total: int, i: int = i) -> None:
            progress(i * total + done, len(names) * total)

        fit = core_fit_hirm(enc, request, config=config, seed=seed, progress=step)
        fits[name] = fit
        deltas.extend(fit.deltas)
        patcher_patches = clip.patcher.get_key_patches()
        for d in fit.deltas:
            base[d.key] = patcher_patches[d.key][0][0] if d.key in patcher_patches else enc.root.state_dict()[d.key]
    family = detect_family(model).name if model is not None else "generic"
    first = next(iter(fits.values()))
    merged = HirmFit(
        deltas,
        [sum(f.losses[k] for f in fits.values()) for k in range(len(first.losses))],
        first.c,
        first.h_norm,
        first.prompts,
        first.epochs,
        first.lr,
        {k: v for f in fits.values() for k, v in f.compression_error.items()},
    )
    per_encoder = {n: {"loss_first": f.losses[0], "loss_last": f.losses[-1], "c": f.c} for n, f in fits.items()}
    patch = to_patch(merged, request, config=config, model_family=family, base_weights=base)
    _, edited = apply_weight_patch(None, clip, patch, 1.0)
    sets = build_prompt_sets(request, max_templates=4)
    retain = {}
    report = None
    for name in names:
        f_before, a_before = _outputs(clip, name, sets.forget[: len(sets.pairs)]), _outputs(clip, name, sets.anchors)
        r_before = _outputs(clip, name, list(sets.retain))
        f_after, r_after = _outputs(edited, name, sets.forget[: len(sets.pairs)]), _outputs(edited, name, sets.retain)
        rep = conditioning_report(list(zip(f_after, f_before, a_before)), [], list(zip(r_after, r_before)))
        retain[name] = rep.retain_drift_max
        report = report or rep
    metrics = dict(
        report.as_dict(),
        retain_drift=max(retain.values()),
        retain_drift_per_encoder=retain,
        per_encoder=per_encoder,
    )
    metrics.pop("holdout_leakage", None)
    patch = to_patch(
        merged,
        request,
        config=config,
        model_family=family,
        base_weights=base,
        metrics=metrics,
        fit_config={"encoders": names},
    )
    image = draw_loss(merged, title=f"HiRM-{variant} on {', '.join(names)}")
    summary = f"HiRM-{variant} on {', '.join(names)}: " + format_metrics(
        {k: v for k, v in patch.metrics.items() if k in ("loss_first", "loss_last", "loss_drop", "c", "retain_drift")}
    )
    return FitResult(patch, image, summary, {"fits": fits})
