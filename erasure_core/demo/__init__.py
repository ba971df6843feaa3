"""``python -m erasure_core demo``: every method on one embedded default, and a before/after table.

No ComfyUI needed. The default request: erase "Van Gogh" towards "a painting" (preset
``style``, its templates, held-out templates and retain artists; seed 0).

* text-encoder methods on the real pretrained all-MiniLM-L6-v2 (``adapters.hf.load_minilm``,
  6 blocks, 384 wide): CLEAR (at strength 1 and 2), HiRM-S, ErasePro's text stages;
  measured on the encoder's output (``demo.text``);
* K/V methods on 16 random-weight cross-attention layers at SD1.5's widths (320-1280) that
  read MiniLM's real 384-wide output: PURE (anchor variant) and ErasePro's text + K/V stages;
  measured on the K/V outputs (``demo.kv``).

Per method: leakage of the fitted forget prompts and of held-out templates (1 = unchanged,
0 = became the anchor), retain cosine (1 = unchanged), cosine of the forget outputs to the
anchor's, the method's own numbers, and the patch file written under ``out_dir`` with its
size. ``quick=True`` runs the same pipeline with few steps (smoke tests). Progress bars on
stderr, logging through ``logging``; only the table goes to stdout.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from ..prompts import ConceptRequest, build_prompt_sets
from .common import ANCHOR, PRESET, SEED, TARGET, DemoRow, DemoSettings

log = logging.getLogger(__name__)

__all__ = ["DemoRow", "DemoSettings", "demo_rows", "format_table", "run_demo"]


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.1f} MiB"


def demo_rows(out_dir: Path, settings: DemoSettings) -> list[DemoRow]:
    """Fit every method, write its patch under ``out_dir``, and return the table rows (baselines first)."""
    from ..adapters.hf import load_minilm
    from . import kv, text

    torch.manual_seed(SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = load_minilm()
    request = ConceptRequest.create([TARGET], anchor=ANCHOR, preset=PRESET)
    sets = build_prompt_sets(request)
    log.info(
        "demo: %d forget, %d held-out, %d retain prompts", len(sets.pairs), len(sets.holdout_pairs), len(sets.retain)
    )
    stack = kv.build_stack(encoder.hidden_size)
    weights = stack.weights()
    rows = [text.baseline_row(encoder, request, sets)]
    rows += text.clear_rows(encoder, request, settings, out_dir)
    rows.append(text.hirm_row(encoder, request, settings, out_dir))
    rows.append(text.erasepro_text_row(encoder, request, out_dir))
    rows.append(kv.baseline_row(encoder, weights, request, sets))
    rows.append(kv.pure_row(encoder, stack, request, sets, settings, out_dir))
    rows.append(kv.erasepro_kv_row(encoder, stack, request, out_dir))
    return rows


def format_table(rows: list[DemoRow], *, title: str) -> str:
    """The before/after table as text (one block per place measured)."""
    head = (
        f"{'method':24s} {'forget leak':>11s} {'held-out leak':>13s} {'retain cos':>10s} {'cos->anchor':>11s} "
        f"{'fit s':>6s}  {'patch file':34s} {'size':>9s}  notes"
    )
    lines = [title]
    where = None
    for r in rows:
        if r.measured_on != where:
            where = r.measured_on
            lines += ["", f"measured on: {where}", head, "-" * len(head)]
        name = r.path.name if r.path is not None else "-"
        size = _human(r.size) if r.path is not None else "-"
        secs = f"{r.seconds:6.1f}" if r.seconds else f"{'-':>6s}"
        lines.append(
            f"{r.method:24s} {r.forget_leakage:11.3f} {r.holdout_leakage:13.3f} {r.retain_cos:10.4f} "
            f"{r.cos_anchor:11.3f} {secs}  {name:34s} {size:>9s}  {r.notes}"
        )
    lines += [
        "",
        "leakage: 1 = unchanged, 0 = became the anchor (projection onto original -> anchor, token-mean pooled);",
        "retain cos: cosine of retain prompts to their originals; K/V numbers: mean over the 32 K/V weights.",
    ]
    return "\n".join(lines) + "\n"


def run_demo(out_dir: Path, quick: bool = False) -> int:
    """Run the demo, print the table to stdout; returns the exit code (0)."""
    settings = DemoSettings.quick() if quick else DemoSettings.full()
    t0 = time.perf_counter()
    rows = demo_rows(Path(out_dir), settings)
    total = time.perf_counter() - t0
    title = (
        f"Concept erasure demo{' (quick)' if quick else ''}: erase {TARGET!r} -> {ANCHOR!r} (preset {PRESET}, "
        f"seed {SEED}); text encoder: pretrained all-MiniLM-L6-v2 (6 blocks, d=384); K/V: 16 random "
        f"cross-attention layers at SD1.5 widths 320-1280 reading its output. {total:.0f} s on "
        f"{torch.get_num_threads()} CPU threads; patch files in {out_dir}/"
    )
    sys.stdout.write(format_table(rows, title=title))
    sys.stdout.flush()
    return 0
