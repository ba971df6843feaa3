"""``python -m erasure_core fit --method hirm --encoder DIR --target ... --out patch.safetensors``.

Trains block 0 of a local ``transformers`` encoder (HiRM-R or HiRM-S), measures leakage
and retain drift with the deltas applied, and returns the patch (model family ``"hf"``).
"""

from __future__ import annotations

import argparse

from ..cli_args import request_from_args
from ..patch_file import ErasurePatch
from ..progress import tqdm_progress
from .fit import HirmConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """HiRM's options (the concept options are added by ``erasure_core.cli``)."""
    p.add_argument("--variant", default="S", choices=["R", "S"], help="R: random directions, S: superordinate")
    p.add_argument("--superordinate", default=None, help="HiRM-S target concept (default: anchor or preset's)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the preset's)")
    p.add_argument("--c", type=float, default=None, help="steering scale (default: calibrated for R, 1 for S)")
    p.add_argument("--rank", type=int, default=0, help="store deltas as rank-N SVD (0: dense)")


def run(args: argparse.Namespace) -> ErasurePatch:
    """Fit, measure and return the patch (the caller writes it)."""
    from ..adapters.hf import HFTextEncoder
    from ..evaluate import evaluate_encoder_patch
    from .fit import fit_hirm, to_patch

    request = request_from_args(args)
    config = HirmConfig(
        variant=args.variant,
        epochs=args.epochs,
        lr=args.lr,
        c=args.c,
        superordinate=args.superordinate,
        compress_rank=args.rank,
    )
    encoder = HFTextEncoder.from_pretrained(args.encoder, device=args.device)
    with tqdm_progress("HiRM fit", disable=args.quiet) as progress:
        fit = fit_hirm(encoder, request, config=config, seed=args.seed, progress=progress)
    base = {k: v.detach() for k, v in encoder.root.named_parameters()}
    patch = to_patch(fit, request, config=config, model_family="hf", base_weights=base)
    report = evaluate_encoder_patch(patch, encoder)
    metrics = dict(report.as_dict(), retain_drift=report.retain_drift_max)
    return to_patch(fit, request, config=config, model_family="hf", base_weights=base, metrics=metrics)
