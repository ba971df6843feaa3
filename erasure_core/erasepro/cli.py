"""``python -m erasure_core fit --method erasepro --encoder DIR --target ... --out patch.safetensors``.

Runs ErasePro's text-encoder stages on a local ``transformers`` encoder. With
``--kv-weights FILE`` (a plain safetensors file of cross-attention K/V weights
``(d_out, d_c)`` that read the encoder's output, keyed by their denoiser state-dict
keys), a final K/V stage edits those too; its deltas are stored under the same keys.
"""

from __future__ import annotations

import argparse
import logging

from ..cli_args import parse_blocks, request_from_args
from ..errors import ErasureError
from ..patch_file import ErasurePatch
from ..progress import tqdm_progress
from .textstages import SCHEDULES, EraseProConfig

log = logging.getLogger(__name__)


def _blocks_or_all(text: str) -> tuple[int, ...] | None:
    return parse_blocks(text, allow_all=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """ErasePro's options (the concept options are added by ``erasure_core.cli``)."""
    d = EraseProConfig()
    p.add_argument("--blocks", type=_blocks_or_all, default=None, help="text-encoder blocks to edit: all, none, '0-5'")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES, help="alpha schedule over the stages")
    p.add_argument("--lam", type=float, default=d.lam_rel, help="retain regulariser, relative to the inputs' scale")
    p.add_argument("--tol", type=float, default=d.tol, help="singular-value cut of the constrained columns")
    p.add_argument("--max-templates", type=int, default=None, help="use only the first N preset templates")
    p.add_argument("--kv-weights", default=None, help="safetensors file of K/V weights reading the encoder output")


def run(args: argparse.Namespace) -> ErasurePatch:
    """Fit, measure and return the patch (the caller writes it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..adapters.hf import HFTextEncoder
    from ..evaluate import evaluate_encoder_patch
    from .fit import fit_headless, to_patch

    request = request_from_args(args)
    config = EraseProConfig(
        blocks=args.blocks, schedule=args.schedule, lam_rel=args.lam, tol=args.tol, max_templates=args.max_templates
    )
    kv = None
    if args.kv_weights:
        try:
            kv = {k: v.float() for k, v in load_file(args.kv_weights).items() if v.ndim == 2}
        except (SafetensorError, OSError) as e:
            raise ErasureError(f"cannot read --kv-weights {args.kv_weights}: {e}") from None
        if not kv:
            raise ErasureError(f"--kv-weights {args.kv_weights} has no 2-D weight; give the K/V weight matrices")
    encoder = HFTextEncoder.from_pretrained(args.encoder, device=args.device)
    with tqdm_progress("ErasePro fit", disable=args.quiet) as progress:
        fit = fit_headless(encoder, request, config=config, kv_weights=kv, progress=progress)
    params = dict(encoder.root.named_parameters())
    base = {d.key: params[d.key].detach() for d in fit.text.deltas}
    base.update(kv or {})
    fit_config = dict(config.as_dict(), encoder=encoder.name, kv_weights=bool(kv))
    patch = to_patch(fit, request, model_family="hf", fit_config=fit_config, base_weights=base)
    report = evaluate_encoder_patch(patch, encoder, sets=fit.text.sets)
    return to_patch(fit, request, model_family="hf", fit_config=fit_config, base_weights=base, metrics=report.as_dict())
