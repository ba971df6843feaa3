"""The CLEAR fit report picture (METHODS.md, CLEAR step 8; the paper's figure 5).

One row per target: left, the probability of each candidate block (softmax of
``log alpha``) over the search steps, with the temperature on a second axis; right,
the per-block separability of positive vs negative tokens (``S_spe / (S_spe + S_uni)``
with the search SAE, bars; the SAE-free difference-of-means AUC, dots), the chosen
block highlighted.
"""

from __future__ import annotations

import torch

from ..report import figure_to_image, new_figure
from .fit import ClearFit


def draw_report(fit: ClearFit, *, title: str | None = None) -> torch.Tensor:
    """The report of ``fit`` as an ``(H, W, 3)`` float32 image in ``[0, 1]``."""
    n = max(1, len(fit.targets))
    fig, axes = new_figure(11.0, 3.4 * n)
    fig.clf()
    grid = fig.subplots(n, 2, squeeze=False, gridspec_kw={"width_ratios": [3, 2]})
    for row, t in zip(grid, fit.targets):
        ax, bx = row
        probs = t.layer_probs.numpy()
        steps = list(t.steps)
        cmap = __import__("matplotlib").colormaps["viridis"]
        for j, b in enumerate(t.blocks):
            chosen = b == t.module.block
            ax.plot(
                steps,
                probs[:, j],
                color=cmap(j / max(len(t.blocks) - 1, 1)),
                lw=2.4 if chosen else 1.0,
                label=f"block {b}" + (" (chosen)" if chosen else ""),
            )
        ax.set_xlabel("search step")
        ax.set_ylabel("layer probability")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{t.concept!r}: layer search -> block {t.module.block}")
        if len(t.blocks) <= 12:
            ax.legend(fontsize=7, loc="upper left", ncol=2)
        tx = ax.twinx()
        tx.plot(steps, list(t.tau), color="grey", ls=":", lw=1.0)
        tx.set_yscale("log")
        tx.set_ylabel("tau (dotted)", color="grey")
        colors = ["tab:red" if b == t.module.block else "tab:blue" for b in t.blocks]
        xs = list(range(len(t.blocks)))
        bx.bar(xs, t.separability.numpy(), color=colors, label="SAE separability")
        bx.plot(xs, t.probe_auc.numpy(), "ko", ms=4, label="probe AUC")
        bx.set_xticks(xs, [str(b) for b in t.blocks], fontsize=7)
        bx.set_ylim(0, 1.05)
        bx.set_xlabel("block")
        bx.set_title(f"separability ({t.num_specific} specific features)")
        bx.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return figure_to_image(fig)
