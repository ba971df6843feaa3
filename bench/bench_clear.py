"""CLEAR benchmarks: encode-time overhead of the intervention, and fit time / peak memory.

1. Overhead: a random T5-like block stack at umT5-XXL width (d = 4096, 64 heads,
   gated-GELU FF 10240), one CLEAR module (TopK k = 8) on one block, SAE widths 8d and
   32d. Prints the time of one block, of the intervention, and the ratio
   (with / without) for the measured stack and for a 24-block encoder (the real
   umT5-XXL depth; extrapolated from the per-block time unless ``--real`` runs all 24).
   By default every token fires a specific feature (worst case: the decoder runs on
   every row); ``--hit-rate`` lowers that.
2. Fit: ``search_layer`` steps on random data (6 candidate blocks at tiny width, one
   block at real width 4096), time per 1k steps (extrapolated from ``--fit-steps``) and
   peak memory (CUDA: max allocated; CPU: peak RSS of a fresh process, incl. torch).

    python bench/bench_clear.py                 # short CPU run (2 blocks, 128 tokens)
    python bench/bench_clear.py --real          # 24 blocks, 512 tokens (Wan pads to 512); GPU advised
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import time

import torch
from torch import nn

from erasure_core.clear import ClearConfig, ClearIntervention
from erasure_core.clear.search import NEGATIVE, POSITIVE, LayerData, search_layer
from erasure_core.patch_file import ClearModule


class T5LikeBlock(nn.Module):
    """RMSNorm -> 64-head self-attention -> residual; RMSNorm -> gated-GELU FF -> residual."""

    def __init__(self, d: int, d_ff: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.wi = nn.Linear(d, 2 * d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d)
        x = x + self.o(a)
        g, lin = self.wi(self.n2(x)).chunk(2, dim=-1)
        return x + self.wo(nn.functional.gelu(g) * lin)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def _module(d: int, m: int, n_spec: int, hit_rate: float, dtype: torch.dtype) -> ClearModule:
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d, m, generator=g, dtype=dtype)
    W_dec /= W_dec.norm(dim=0)
    mask = torch.zeros(m, dtype=torch.bool)
    mask[:n_spec] = True
    b_enc = torch.zeros(m, dtype=dtype)
    # feature 0 (specific) gets a bias that makes it win the top-k on a `hit_rate` fraction of tokens
    b_enc[0] = 50.0 if hit_rate >= 1 else (0.0 if hit_rate > 0 else -1e4)
    W_enc = torch.randn(m, d, generator=g, dtype=dtype) / math.sqrt(d)
    return ClearModule("umt5xxl", 0, "block.0", W_enc, b_enc, W_dec, torch.zeros(d, dtype=dtype), mask, 1.0, topk=8)


def bench_overhead(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    d, T = 4096, args.tokens
    blocks = 24 if args.real else args.blocks
    torch.manual_seed(0)
    stack = nn.ModuleList([T5LikeBlock(d, 10240, 64) for _ in range(blocks)]).to(device=device, dtype=dtype).eval()
    x0 = torch.randn(1, T, d, device=device, dtype=dtype)
    with torch.inference_mode():

        def encode() -> torch.Tensor:
            x = x0
            for blk in stack:
                x = blk(x)
            return x

        t_stack = _time(encode, device, args.repeats)
        print(
            f"device {device}, dtype {dtype}, {T} tokens, {blocks} blocks: encode {t_stack * 1e3:.1f} ms "
            f"({t_stack / blocks * 1e3:.1f} ms per block)"
        )
        print(f"{'SAE width':>10} {'MiB':>6} {'interv. ms':>10} {'ratio (stack)':>13} {'ratio (24 blocks)':>17}")
        for factor in (8, 32):
            m = factor * d
            mod = _module(d, m, n_spec=64, hit_rate=args.hit_rate, dtype=torch.float32)
            iv = ClearIntervention(mod)
            h = stack[0](x0)
            iv(h, 1.0)  # moves and caches the SAE tensors
            t_iv = _time(lambda iv=iv, h=h: iv(h, 1.0), device, args.repeats)
            mib = sum(v.numel() * v.element_size() for v in iv._cache[next(iter(iv._cache))].values()) / 2**20
            per_block = t_stack / blocks
            print(
                f"{f'{factor}d = {m}':>10} {mib:6.0f} {t_iv * 1e3:10.2f} {(t_stack + t_iv) / t_stack:13.4f} "
                f"{(24 * per_block + t_iv) / (24 * per_block):17.4f}"
            )
            del iv, mod


def _peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``; ``ru_maxrss`` would include the parent's, kept over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _fit_worker(d: int, L: int, m_factor: int, steps: int, n_tokens: int, batch: int, device: str, q) -> None:
    torch.manual_seed(0)
    dev = torch.device(device)
    x = torch.randn(L, n_tokens, d)
    role = torch.tensor([POSITIVE, NEGATIVE] * (n_tokens // 2))
    data = LayerData.from_hidden(list(x), role, tuple(range(L))).to(dev)
    cfg = ClearConfig(search_steps=steps, finetune_steps=0, width_factor=m_factor, batch_tokens=batch, mask_every=0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.enable_grad():
        search_layer(data, cfg, generator=torch.Generator(device=dev.type).manual_seed(0))
    _sync(dev)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _peak_rss_mib()

    q.put((dt, peak))


def bench_fit(args: argparse.Namespace, device: torch.device) -> None:
    print(f"\nfit (search steps, batch {args.batch} tokens, TopK 8, width 8d) on {device}")
    print(f"{'config':>28} {'steps':>6} {'s per 1k steps':>15} {'peak MiB':>9}")
    ctx = mp.get_context("spawn")
    for name, d, L in (("tiny d=64, 6 blocks", 64, 6), ("real d=4096, 1 block", 4096, 1)):
        steps = args.fit_steps if d > 64 else max(args.fit_steps, 50)
        q = ctx.Queue()
        p = ctx.Process(target=_fit_worker, args=(d, L, 8, steps, 2 * args.batch, args.batch, str(device), q))
        p.start()
        dt, peak = q.get()
        p.join()
        print(f"{name:>28} {steps:6d} {dt / steps * 1000:15.1f} {peak:9.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true", help="24 blocks and 512 tokens (umT5-XXL in Wan)")
    p.add_argument("--blocks", type=int, default=2, help="blocks in the stack without --real")
    p.add_argument("--tokens", type=int, default=None, help="tokens per prompt (default 128, 512 with --real)")
    p.add_argument("--hit-rate", type=float, default=1.0, help="1: every token fires a specific feature, 0: none")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fit-steps", type=int, default=3, help="search steps measured at real width")
    p.add_argument("--batch", type=int, default=256, help="tokens per fit step")
    p.add_argument("--skip-fit", action="store_true")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    args.tokens = args.tokens or (512 if args.real else 128)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not args.skip_overhead:
        bench_overhead(args, device, dtype)
    if not args.skip_fit:
        bench_fit(args, device)


if __name__ == "__main__":
    main()
