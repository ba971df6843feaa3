"""ErasePro benchmark: total fit time vs the single-stage UCE formula, and deep-layer delta norms.

Random ``transformers`` CLIP text encoders stand in for SD1.5 (CLIP-L: d 768) and SDXL
(one encoder of width 2048 standing in for CLIP-L + CLIP-G concatenated), with random
cross-attention K/V weights of the real shapes (SD1.5: 16 layers, outputs 320/640/1280;
SDXL: 70 layers, outputs 640/1280). For each:

* ErasePro: the V-projection stages of every text block, then all K/V jointly (alpha = 1);
* UCE: ``regularized_delta`` on every K/V once (targets -> anchors, retain kept), same tokens;
* deep-layer delta norm: sum over K/V of ``||Delta||_F`` with the progressive schedule vs
  editing the K/V only (``blocks=()``), the paper's claim being that progressive is smaller.

    python bench/bench_erasepro.py           # 4 text blocks, 4 templates (short)
    python bench/bench_erasepro.py --full    # 12 text blocks, all templates
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from erasure_core.erasepro import EraseProConfig, fit_headless  # noqa: E402
from erasure_core.erasepro.fit import kv_inputs_from_rows  # noqa: E402
from erasure_core.erasepro.textstages import aligned_tokens  # noqa: E402
from erasure_core.prompts import ConceptRequest, build_prompt_sets  # noqa: E402
from erasure_core.solver import SymmetricSolver, normal_matrix, regularized_delta  # noqa: E402

MODELS = {
    "SD1.5": {"d": 768, "heads": 12, "kv": [320] * 4 + [640] * 4 + [1280] * 8},
    "SDXL": {"d": 2048, "heads": 16, "kv": [640] * 8 + [1280] * 62},
}


def _encoder(d: int, heads: int, blocks: int):
    from _tiny_vocab import tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasure_core.adapters.hf import HFTextEncoder

    tok = tokenizer()
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=d,
        intermediate_size=4 * d,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        max_position_embeddings=77,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return HFTextEncoder(CLIPTextModel(cfg).eval(), tok)


def _uce(enc, request, config, kv) -> float:
    """Time of the single-stage UCE closed form on every K/V (encoding included)."""
    t = time.perf_counter()
    sets = build_prompt_sets(request, max_templates=config.max_templates)
    tok = aligned_tokens(enc.tokenize, sets, causal=enc.layout.causal)
    out = lambda ps: [e.output for e in enc.encode(ps)]  # noqa: E731
    inp = kv_inputs_from_rows(tok, out(tok.target_prompts), out(tok.anchor_prompts), out(list(sets.retain)))
    X, Xa, Xr = (x.double() for x in (inp.X_t, inp.X_a, inp.X_r))
    lam = 1e-3 * float((Xr**2).sum()) / Xr.shape[0]
    solver = SymmetricSolver(normal_matrix(X, Xr, lam))
    for W in kv.values():
        regularized_delta(W, X, W.double() @ Xa, X_keep=Xr, lam=lam, solver=solver)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="12 text blocks and all templates")
    args = p.parse_args()
    blocks, templates = (12, None) if args.full else (4, 4)
    request = ConceptRequest.create("dog", anchor="cat")
    rows = []
    for name, m in MODELS.items():
        enc = _encoder(m["d"], m["heads"], blocks)
        g = torch.Generator().manual_seed(1)
        kv = {
            f"l{i}.to_{w}.weight": torch.randn(o, m["d"], generator=g) / m["d"] ** 0.5
            for i, o in enumerate(m["kv"])
            for w in "kv"
        }
        config = EraseProConfig(max_templates=templates)
        t = time.perf_counter()
        prog = fit_headless(enc, request, config=config, kv_weights=kv)
        t_ep = time.perf_counter() - t
        deep = fit_headless(enc, request, config=dataclasses.replace(config, blocks=()), kv_weights=kv)
        t_uce = _uce(enc, request, config, kv)
        norm = lambda f: sum(float(torch.linalg.norm(d.delta())) for d in f.kv.deltas)  # noqa: E731
        rows.append((name, len(kv), t_ep, t_uce, norm(prog), norm(deep), prog.metrics()["residual"]))
    print(
        f"{'model':6s} {'K/V':>4s} {'ErasePro s':>10s} {'UCE s':>7s} {'ratio':>6s} "
        f"{'sum|dKV| progressive':>21s} {'sum|dKV| K/V only':>18s} {'residual':>9s}"
    )
    for name, n, te, tu, npg, nd, res in rows:
        print(f"{name:6s} {n:4d} {te:10.2f} {tu:7.2f} {te / tu:6.1f} {npg:21.4f} {nd:18.4f} {res:9.1e}")


if __name__ == "__main__":
    main()
