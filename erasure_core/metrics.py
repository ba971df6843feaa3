"""What is measured without generating images (METHODS.md, last section).

* leakage of a forget prompt: how far its edited conditioning still is from the
  anchor's, along the line from the original to the anchor. With ``o``, ``a``, ``e``
  the mean-pooled original, anchor and edited conditionings (``(d,)``)::

      t = <e - o, a - o> / ||a - o||^2       (0: unchanged, 1: became the anchor)
      leakage = 1 - clamp(t, 0, 1)

  plus the cosines ``cos(e, o)`` and ``cos(e, a)`` reported beside it;
* retain drift: ``1 - cos(e, o)`` for retain prompts (or K/V outputs);
* relative residual of a closed-form solve: ``||W' X - Y|| / ||Y||``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def pooled(x: torch.Tensor) -> torch.Tensor:
    """Mean over tokens: ``(T, d) -> (d,)`` in float64."""
    return x.double().mean(0) if x.ndim == 2 else x.double()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two vectors (or of two token matrices after flattening)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float((a @ b / (a.norm() * b.norm()).clamp_min(1e-30)).item())


def leakage(edited: torch.Tensor, original: torch.Tensor, anchor: torch.Tensor) -> float:
    """``1 - clamp(<e - o, a - o> / ||a - o||^2, 0, 1)`` on pooled conditionings."""
    e, o, a = pooled(edited), pooled(original), pooled(anchor)
    d = a - o
    t = float(((e - o) @ d / (d @ d).clamp_min(1e-30)).item())
    return 1.0 - min(max(t, 0.0), 1.0)


def retain_drift(edited: torch.Tensor, original: torch.Tensor) -> float:
    """``1 - cos`` between edited and original (token matrices compared as a whole)."""
    return 1.0 - cosine(edited, original)


def relative_residual(W_new: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> float:
    """``||W' X - Y|| / ||Y||`` (``W'``: ``(d_out, d_in)``, ``X``: ``(d_in, n)``, ``Y``: ``(d_out, n)``)."""
    W_new, X, Y = W_new.double(), X.double(), Y.double()
    return float((torch.linalg.norm(W_new @ X - Y) / torch.linalg.norm(Y).clamp_min(1e-30)).item())


@dataclass(frozen=True)
class ConditioningReport:
    """Before/after numbers of an edit on three prompt groups (means over prompts).

    ``forget_leakage``/``holdout_leakage``: mean leakage (1 = untouched, 0 = anchor);
    ``forget_cos_original``/``forget_cos_anchor``: mean cosines of pooled edited forget
    conditionings to their originals and anchors; ``retain_cos``: mean cosine of
    retain prompts to their originals (1 = unchanged); ``retain_drift_max``: worst drift.
    """

    forget_leakage: float
    holdout_leakage: float
    forget_cos_original: float
    forget_cos_anchor: float
    retain_cos: float
    retain_drift_max: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 6) for k, v in self.__dict__.items()}


def conditioning_report(
    forget: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    holdout: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    retain: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> ConditioningReport:
    """Summarise ``(edited, original, anchor)`` triples and ``(edited, original)`` retain pairs."""

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    rc = [cosine(pooled(e), pooled(o)) for e, o in retain]
    return ConditioningReport(
        forget_leakage=mean([leakage(e, o, a) for e, o, a in forget]),
        holdout_leakage=mean([leakage(e, o, a) for e, o, a in holdout]),
        forget_cos_original=mean([cosine(pooled(e), pooled(o)) for e, o, _ in forget]),
        forget_cos_anchor=mean([cosine(pooled(e), pooled(a)) for e, _, a in forget]),
        retain_cos=mean(rc),
        retain_drift_max=max((1 - c for c in rc), default=float("nan")),
    )
