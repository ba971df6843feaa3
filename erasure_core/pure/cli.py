"""``python -m erasure_core fit --method pure --encoder DIR --target ... --out patch.safetensors``.

PURE without a denoiser: the cross-attention layers read the local ``transformers``
encoder's output ``c`` (``(T, d_c)``) directly, and the read vectors ``R = A c`` come from
random image queries (no sampling runs headless). The layers are either

* ``--kv-weights FILE``: a plain safetensors file of K/V weight matrices ``(d_out, d_c)``
  that read the encoder output, keyed by their denoiser state-dict keys. Keys are grouped
  into layers by their module (the key without its last two parts: ``...attn2.to_k.weight``
  -> ``...attn2``); the layer's K weight (``to_k``/``k``/``k_proj``/``key``; else its first
  weight) scores random queries, ``W_q`` random. The patch's deltas use the file's keys.
* otherwise the random SD1.5-shaped stack of the demo (``erasure_core.demo.kv.build_stack``:
  16 layers, 320-1280 wide), keys ``layers.{i}.attn2.to_{k,v}.weight``.

Per layer the fit removes ``Q`` (``(d_c, r)``): ``W' = W + up @ down``, ``up = -W Q`` (``W (D - Q)``
with an anchor), ``down = Q^T``. Metrics (``erasure_core.demo.kv.kv_report``): leakage and
retain cosine of the K/V outputs, relative retain K/V change, forget read energy removed.
"""

from __future__ import annotations

import argparse
import logging
import math

import torch

from ..adapters.base import TextEncoderAdapter
from ..cli_args import request_from_args
from ..errors import ErasureError, FitError
from ..patch_file import ErasurePatch, make_delta, weight_fingerprint
from ..progress import ProgressFn, noop_progress, tqdm_progress
from ..prompts import ConceptRequest
from .fitter import PureEraser, PureFitter
from .jobs import capture_jobs, last_of_target
from .synthetic import SyntheticLayer, SyntheticStack

log = logging.getLogger(__name__)

#: ``{state-dict key: (layer, W)}`` of the K/V weights being edited
Weights = dict[str, tuple[str, torch.Tensor]]
_K_NAMES = ("to_k", "k", "k_proj", "key")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """PURE's options (the concept options are added by ``erasure_core.cli``)."""
    p.add_argument("--rank", type=int, default=8, help="directions removed per target and layer (cap)")
    p.add_argument("--threshold", type=float, default=10.0, help="minimum forget/retain eigenvalue ratio kept")
    p.add_argument("--queries", type=int, default=64, help="random image queries per layer and prompt")
    p.add_argument("--read-seeds", type=int, default=2, help="query draws per prompt")
    p.add_argument("--kv-weights", default=None, help="safetensors file of K/V weights reading the encoder output")


def load_kv_stack(path: str, d_c: int, *, seed: int = 0) -> tuple[SyntheticStack, Weights]:
    """The layers of a ``--kv-weights`` file (module docstring) and their ``{key: (layer, W)}``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ErasureError(f"cannot read --kv-weights {path}: {e}") from None
    kv = {k: v.float() for k, v in tensors.items() if v.ndim == 2}
    if not kv:
        raise ErasureError(f"--kv-weights {path} has no 2-D weight; give the K/V weight matrices (d_out, d_c)")
    bad = [f"{k} {tuple(v.shape)}" for k, v in kv.items() if v.shape[1] != d_c]
    if bad:
        raise ErasureError(
            f"--kv-weights {path}: {bad[0]} does not read the encoder's {d_c}-wide output (weights are "
            f"(d_out, d_c) with d_c = {d_c}); give the K/V weights of a model conditioned on this encoder"
        )
    groups: dict[str, list[str]] = {}
    for key in kv:
        parts = key.split(".")
        groups.setdefault(".".join(parts[:-2]) if len(parts) > 2 else key, []).append(key)
    g = torch.Generator().manual_seed(seed)
    layers, weights = [], {}
    for name, keys in groups.items():
        k_key = next((k for k in keys if k.split(".")[-2] in _K_NAMES), keys[0])
        v_key = next((k for k in keys if k != k_key), k_key)
        W_k = kv[k_key]
        w = W_k.shape[0]
        heads = w // 64 if w % 64 == 0 and w >= 64 else 1
        W_q = torch.randn(w, w, generator=g) / math.sqrt(w)
        layers.append(SyntheticLayer(name, W_q, W_k, kv[v_key], heads))
        weights.update({k: (name, kv[k]) for k in keys})
    return SyntheticStack(tuple(layers), d_c), weights


def fit_stack(
    encoder: TextEncoderAdapter,
    stack: SyntheticStack,
    request: ConceptRequest,
    *,
    rank: int = 8,
    threshold: float = 10.0,
    queries: int = 64,
    read_seeds: int = 2,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> tuple[PureEraser, PureFitter]:
    """Reads of every retain, forget and anchor prompt on ``stack`` -> the fitted ``PureEraser``."""
    progress = progress or noop_progress
    jobs = capture_jobs(request)
    fitter = PureFitter(stack.dims, rank=rank, threshold=threshold, seed=seed)
    total = len(jobs) + 1
    progress(0, total)
    for i, (kind, t, prompt) in enumerate(jobs):
        c = encoder.encode([prompt])[0].output.float()
        for s in range(read_seeds):
            for layer, R in stack.reads(c, queries=queries, seed=seed + 1000 * s + i).items():
                if kind == "anchor":
                    fitter.update_anchor(layer, R, target=t)
                else:
                    fitter.update(layer, R, forget=kind == "forget", target=t)
        if last_of_target(jobs, i) and t in fitter.forget:
            fitter.finish_target(t)
        progress(i + 1, total)
    eraser = fitter.solve()
    progress(total, total)
    return eraser, fitter


def to_patch(
    eraser: PureEraser, weights: Weights, request: ConceptRequest, config: dict, metrics: dict | None = None
) -> ErasurePatch:
    """The K/V deltas of ``eraser`` on ``weights`` as a headless (``"hf"``) patch."""
    deltas = tuple(make_delta(key, "model", up, down) for key, (up, down) in eraser.deltas(weights).items())
    if not deltas:
        raise FitError(
            "PURE found no direction that forget prompts read much more than retain prompts; lower "
            "--threshold, add --prompt/--paraphrase, or check that the targets are words the encoder knows"
        )
    fingerprint = {d.key: weight_fingerprint(weights[d.key][1]) for d in deltas}
    return ErasurePatch(
        "pure", "hf", deltas, concept=request.to_dict(), fit_config=config, fingerprint=fingerprint,
        metrics=metrics or {},
    )  # fmt: skip


def run(args: argparse.Namespace) -> ErasurePatch:
    """Fit, measure and return the patch (the caller writes it)."""
    from ..adapters.hf import HFTextEncoder
    from ..demo.kv import build_stack, kv_report
    from ..prompts import build_prompt_sets

    request = request_from_args(args)
    if args.rank < 1 or args.queries < 1 or args.read_seeds < 1:
        raise ErasureError("--rank, --queries and --read-seeds must be at least 1")
    encoder = HFTextEncoder.from_pretrained(args.encoder, device=args.device)
    d_c = int(encoder.hidden_size)
    if args.kv_weights:
        stack, weights = load_kv_stack(args.kv_weights, d_c, seed=args.seed)
        where = f"{len(weights)} K/V weights from {args.kv_weights}"
    else:
        stack = build_stack(d_c)
        weights = stack.weights()
        where = "synthetic SD1.5 widths, random weights"
    config = dict(rank=args.rank, threshold=args.threshold, queries=args.queries, read_seeds=args.read_seeds)
    config.update(seed=args.seed, encoder=encoder.name, d_c=d_c, stack=where)
    with tqdm_progress("PURE fit", disable=args.quiet) as progress:
        eraser, _ = fit_stack(
            encoder, stack, request, rank=args.rank, threshold=args.threshold, queries=args.queries,
            read_seeds=args.read_seeds, seed=args.seed, progress=progress,
        )  # fmt: skip
    patch = to_patch(eraser, weights, request, config)
    report, change, change_max = kv_report(encoder, weights, patch, build_prompt_sets(request))
    ranks = [eraser.rank(layer) for layer in eraser.layers]
    energy = sum(eraser.energy.values()) / max(len(eraser.energy), 1)
    metrics = dict(report.as_dict(), layers=len(ranks), rank_min=min(ranks), rank_max=max(ranks))
    metrics.update(forget_energy_removed_mean=round(energy, 6), retain_kv_change_mean=round(change, 6))
    metrics.update(retain_kv_change_max=round(change_max, 6))
    return to_patch(eraser, weights, request, config, metrics)
