"""Fit results and the report picture every method draws.

``FitResult`` is what a fit returns to its caller (node, command line, demo): the
patch, a picture (``(H, W, 3)`` float tensor in ``[0, 1]``, ComfyUI's IMAGE layout
without the batch axis) and a one-paragraph summary with the measured numbers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch

from .patch_file import ErasurePatch


@dataclass(frozen=True)
class FitResult:
    """What one fit produced."""

    patch: ErasurePatch
    image: torch.Tensor | None = None
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def figure_to_image(fig: Any) -> torch.Tensor:
    """A matplotlib figure as an ``(H, W, 3)`` float32 tensor in ``[0, 1]`` (then closed)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    arr = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())


def new_figure(width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    """A headless matplotlib figure and axes (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def format_metrics(metrics: dict[str, Any]) -> str:
    """``key=value`` pairs of the scalar metrics, for summaries."""
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        elif isinstance(v, (int, str)):
            parts.append(f"{k}={v}")
    return ", ".join(parts)
