"""``python -m erasure_core fit --method clear --encoder DIR --target ... --out patch.safetensors``.

Fits one CLEAR module per target on a local ``transformers`` encoder (CLIP text model,
T5/UMT5 encoder, BERT), measures leakage / retain with the modules hooked in, and
returns the patch (model family ``"hf"``); ``--report`` also writes the picture.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli_args import parse_blocks, request_from_args
from ..errors import ErasureError
from ..patch_file import ErasurePatch
from ..progress import tqdm_progress
from .search import ClearConfig

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CLEAR's options (the concept options are added by ``erasure_core.cli``)."""
    d = ClearConfig()
    p.add_argument("--search-steps", type=int, default=d.search_steps, help="layer-search steps")
    p.add_argument(
        "--finetune-steps", type=int, default=d.finetune_steps, help="SAE fine-tune steps at the chosen block"
    )
    p.add_argument("--topk", type=int, default=d.topk, help="active SAE features per token (0: ReLU + --l1)")
    p.add_argument("--l1", type=float, default=d.l1, help="L1 penalty (ReLU SAE only)")
    p.add_argument("--width-factor", type=int, default=d.width_factor, help="SAE width as a multiple of d")
    p.add_argument("--blocks", type=parse_blocks, default=None, help="candidate blocks, e.g. '2-9' (default: all)")
    p.add_argument("--eps-shared", type=float, default=d.eps_shared, help="max firing rate on negatives")
    p.add_argument("--eps-specific", type=float, default=d.eps_specific, help="min firing rate on positives")
    p.add_argument("--background", type=int, default=d.background, help="everyday captions added to negatives")
    p.add_argument("--gamma", type=float, default=d.gamma, help="default strength stored in the patch")
    p.add_argument("--report", default=None, help="also write the report picture (PNG) here")


def config_from_args(args: argparse.Namespace) -> ClearConfig:
    return ClearConfig(
        search_steps=args.search_steps,
        finetune_steps=args.finetune_steps,
        topk=args.topk,
        l1=args.l1,
        width_factor=args.width_factor,
        blocks=args.blocks,
        eps_shared=args.eps_shared,
        eps_specific=args.eps_specific,
        background=args.background,
        gamma=args.gamma,
    )


def run(args: argparse.Namespace) -> ErasurePatch:
    """Fit, measure and return the patch (the caller writes it)."""
    from ..adapters.hf import HFTextEncoder
    from ..evaluate import evaluate_encoder_patch
    from .fit import config_dict, fit_clear, to_patch

    request = request_from_args(args)
    config = config_from_args(args)
    encoder = HFTextEncoder.from_pretrained(args.encoder, device=args.device)
    with tqdm_progress("CLEAR fit", disable=args.quiet) as progress:
        fit = fit_clear(encoder, request, config=config, seed=args.seed, progress=progress)
    unmeasured = to_patch(fit, encoder, request, model_family="hf", fit_config=config_dict(config), report=None)
    report = evaluate_encoder_patch(unmeasured, encoder, sets=fit.sets)
    patch = to_patch(fit, encoder, request, model_family="hf", fit_config=config_dict(config), report=report)
    if args.report:
        from PIL import Image

        from .report import draw_report

        image = draw_report(fit, title=f"CLEAR on {encoder.name}")
        path = Path(args.report)
        if path.suffix.lower() != ".png":
            raise ErasureError(f"--report writes a PNG; give a path ending in .png, got {path.name!r}")
        Image.fromarray((image.numpy() * 255).round().astype("uint8")).save(path)
    return patch
