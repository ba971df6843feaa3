"""PURE solve stage vs the UCE reference formula, at real dims with random weights.

Per family (SD1.5 16 layers x 768; SDXL 70 x 2048; Wan2.2-5B 30 x 3072; Flux 19 double
blocks x 3072; K and V of each layer) and for 1, 10, 100 targets, on the same inputs:

* inputs: random weights; per target ``--prompts`` forget conditionings of ``--tokens``
  tokens (and as many aligned anchor ones), ``--retain`` retain conditionings. PURE's read
  vectors per layer are ``A c`` with random attention over those tokens (capture is not
  timed); UCE reads the same tokens;
* PURE solve: ``PureFitter.finish_target`` per target (Cholesky of ``S_R + eps I`` once per
  layer, top-``r`` generalized eigenvectors), ``solve()`` (union, re-orthonormalisation) and
  the K/V factors ``-(W Q) Q^T`` of every weight;
* UCE reference: ``W' = (lam W + sum v c^T + sum W c c^T) @ inverse(lam I + sum c c^T)``
  per K/V matrix, computed as UCE's reference code does (per prompt, per-token outer products
  summed; ``erasure_core.pure.uce.uce_reference``); with ``--uce-sample K`` only K
  matrices are timed and the total is extrapolated (marked ``~``);
* UCE fast: the same edit with one factorisation shared by all layers (``uce_fast``);
* memory: bytes held by PURE's statistics and factors at their peak, and the UCE
  reference's working set per matrix; patch size: the saved ``.safetensors`` per concept.

    python bench/bench_pure.py                  # SD1.5, 1/10/100 targets (about a minute on 2 cores)
    python bench/bench_pure.py --all            # every family; UCE reference sampled on 8 matrices
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from erasure_core.patch_file import ErasurePatch, make_delta
from erasure_core.pure import PureFitter
from erasure_core.pure.synthetic import REAL_DIMS
from erasure_core.pure.uce import uce_fast, uce_reference


def _contexts(n: int, tokens: int, d: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, tokens, d, generator=g) / d**0.5


def _reads(c: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``A c`` for every conditioning in ``c`` (``(n, T, d)``), one random attention row per token."""
    A = (2.0 * torch.randn(c.shape[0], c.shape[1], c.shape[1], generator=g)).softmax(-1)
    return (A @ c).reshape(-1, c.shape[-1])


def run(family: str, n_targets: int, args: argparse.Namespace) -> dict:
    widths, d = REAL_DIMS[family]
    g = torch.Generator().manual_seed(0)
    layers = [f"l{i}" for i in range(len(widths))]
    weights = {}
    for name, w in zip(layers, widths):
        for which in ("k", "v"):
            weights[f"{name}.{which}"] = (name, torch.randn(w, d, generator=g) / d**0.5)
    retain = _contexts(args.retain, args.tokens, d, g)
    forget = [_contexts(args.prompts, args.tokens, d, g) for _ in range(n_targets)]
    anchor = _contexts(args.prompts, args.tokens, d, g)

    fitter = PureFitter(dict.fromkeys(layers, d), rank=args.rank)
    for name in layers:
        fitter.update(name, _reads(retain, g), forget=False)
    solve_s, peak = 0.0, fitter.memory_bytes()
    for t in range(n_targets):
        for name in layers:
            fitter.update(name, _reads(forget[t], g), forget=True, target=t)
        peak = max(peak, fitter.memory_bytes())
        t0 = time.perf_counter()
        fitter.finish_target(t)
        solve_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    eraser = fitter.solve()
    factors = eraser.deltas(weights)
    solve_s += time.perf_counter() - t0
    peak = max(peak, fitter.memory_bytes())

    deltas = [make_delta(k, "model", up, down) for k, (up, down) in factors.items()]
    with tempfile.TemporaryDirectory() as tmp:
        path = ErasurePatch("pure", "generic", deltas=tuple(deltas)).save(os.path.join(tmp, "p.safetensors"))
        size = path.stat().st_size

    C_e = torch.cat([f.reshape(-1, d) for f in forget]).T.contiguous()
    C_a = anchor.reshape(-1, d).T.repeat(1, n_targets).contiguous()
    C_k = retain.reshape(-1, d).T.contiguous()
    t0 = time.perf_counter()
    uce_fast({k: W for k, (_, W) in weights.items()}, C_e, C_a, C_k)
    fast_s = time.perf_counter() - t0

    ref_s, sampled = None, False
    if not args.no_uce_ref:
        keys = list(weights)
        timed = keys if args.uce_sample <= 0 or family == "sd15" else keys[: args.uce_sample]
        t0 = time.perf_counter()
        for k in timed:
            uce_reference(weights[k][1], C_e, C_a, C_k, prompt_tokens=args.tokens)
        ref_s = (time.perf_counter() - t0) * len(keys) / len(timed)
        sampled = len(timed) < len(keys)
    ranks = [eraser.rank(name) for name in layers]
    return {
        "family": family,
        "targets": n_targets,
        "rank": f"{min(ranks)}-{max(ranks)}",
        "pure_s": solve_s,
        "pure_mib": peak / 2**20,
        "ref_s": ref_s,
        "sampled": sampled,
        "ref_mib": 4 * (args.tokens * (d + max(widths)) * d + 3 * d * d + max(widths) * d) / 2**20,
        "fast_s": fast_s,
        "kib_per_concept": size / 1024 / n_targets,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="sd15", help="comma list of " + ",".join(REAL_DIMS))
    p.add_argument("--all", action="store_true", help="every family")
    p.add_argument("--targets", default="1,10,100")
    p.add_argument("--prompts", type=int, default=4, help="forget prompts per target")
    p.add_argument("--tokens", type=int, default=16, help="real tokens per prompt")
    p.add_argument("--retain", type=int, default=16, help="retain prompts")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--uce-sample", type=int, default=8, help="time the UCE reference on this many matrices (0: all)")
    p.add_argument("--no-uce-ref", action="store_true", help="skip the UCE reference formula")
    args = p.parse_args()
    families = list(REAL_DIMS) if args.all else args.families.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    head = (
        f"{'family':9s} {'targets':>7s} {'rank/layer':>10s} {'PURE solve s':>12s} {'PURE MiB':>9s} "
        f"{'UCE ref s':>10s} {'ref/PURE':>8s} {'UCE fast s':>10s} {'KiB/concept':>11s}"
    )
    print(head)
    for family in families:
        for n in (int(x) for x in args.targets.split(",")):
            r = run(family, n, args)
            ref = "-" if r["ref_s"] is None else f"{'~' if r['sampled'] else ''}{r['ref_s']:.2f}"
            ratio = "-" if r["ref_s"] is None else f"{r['ref_s'] / r['pure_s']:.1f}x"
            print(
                f"{family:9s} {n:7d} {r['rank']:>10s} {r['pure_s']:12.2f} {r['pure_mib']:9.0f} "
                f"{ref:>10s} {ratio:>8s} {r['fast_s']:10.2f} {r['kib_per_concept']:11.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
