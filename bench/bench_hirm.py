"""HiRM benchmark: time per epoch and peak memory when training block 0 at CLIP-L and T5-XXL size.

Random ``transformers`` encoders with the real width of CLIP-L (d 768, FF 3072, 12 heads) and
T5-XXL (d 4096, gated-GELU FF 10240, 64 heads); block 0 is trained (HiRM-S on one
concept word), the other blocks are frozen. The depth is reduced by default (the
trained block has its real size; the frozen ones only add forward/backward time);
``--full`` uses the real depths (12 and 24; T5-XXL then needs ~20 GB of memory).
Each configuration runs in a fresh process so that peak memory (CPU: max RSS, incl.
torch; CUDA: max allocated) belongs to it alone.

    python bench/bench_hirm.py            # CLIP-L 2 blocks, T5-XXL 1 block, 3 epochs, CPU
    python bench/bench_hirm.py --full     # real depths
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

CONFIGS = {
    "CLIP-L": {"kind": "clip", "d": 768, "ff": 3072, "heads": 12, "blocks": 12},
    "T5-XXL": {"kind": "t5", "d": 4096, "ff": 10240, "heads": 64, "blocks": 24},
}


def _build(cfg: dict, blocks: int, device: str):
    from _tiny_vocab import tokenizer

    from erasure_core.adapters.hf import HFTextEncoder

    tok = tokenizer()
    torch.manual_seed(0)
    if cfg["kind"] == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        c = CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=cfg["d"],
            intermediate_size=cfg["ff"],
            num_hidden_layers=blocks,
            num_attention_heads=cfg["heads"],
            max_position_embeddings=77,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        model = CLIPTextModel(c)
    else:
        from transformers import T5Config, T5EncoderModel

        c = T5Config(
            vocab_size=len(tok),
            d_model=cfg["d"],
            d_ff=cfg["ff"],
            num_layers=blocks,
            num_heads=cfg["heads"],
            d_kv=64,
            feed_forward_proj="gated-gelu",
        )
        model = T5EncoderModel(c)
    return HFTextEncoder(model.to(device).eval(), tok)


def _one(name: str, blocks: int, epochs: int, device: str, queue) -> None:
    from erasure_core.hirm import HirmConfig, fit_hirm
    from erasure_core.prompts import ConceptRequest

    enc = _build(CONFIGS[name], blocks, device)
    req = ConceptRequest.create("dog", anchor="animal")
    fit_hirm(enc, req, config=HirmConfig(variant="S", epochs=1))  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    fit_hirm(enc, req, config=HirmConfig(variant="S", epochs=epochs))
    per_epoch = (time.perf_counter() - t) / epochs
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    block0 = sum(p.numel() for n, p in enc.root.named_parameters() if n.startswith(enc.layout.block_path(0) + "."))
    queue.put((name, blocks, block0, per_epoch, peak))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="real depths (12 / 24 blocks)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for name, cfg in CONFIGS.items():
        blocks = cfg["blocks"] if args.full else (2 if name == "CLIP-L" else 1)
        q = ctx.Queue()
        proc = ctx.Process(target=_one, args=(name, blocks, args.epochs, args.device, q))
        proc.start()
        rows.append(q.get())
        proc.join()
    mem = "peak CUDA MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"{'encoder':8s} {'blocks':>6s} {'block-0 params':>15s} {'s/epoch':>9s} {mem:>14s}   ({args.device})")
    for name, blocks, n0, per_epoch, peak in rows:
        print(f"{name:8s} {blocks:6d} {n0:15,d} {per_epoch:9.3f} {peak:14.0f}")


if __name__ == "__main__":
    main()
