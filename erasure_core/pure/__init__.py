"""PURE: project the text directions a concept is read through out of every cross-attention K/V.

* ``fitter``: ``PureFitter`` (streaming read-vector statistics per layer) -> ``PureEraser``
  (per-layer orthonormal forget bases, low-rank K/V deltas ``-(W Q) Q^T``, anchor variant);
* ``reads``: head-averaged attention probabilities and read vectors ``R = A c``;
* ``synthetic``: a headless random cross-attention stack (tests, bench, demo);
* ``uce``: the UCE baseline, reference formula and fast shared-factorisation version;
* ``cli``: ``python -m erasure_core fit --method pure`` on a local transformers encoder.
"""

from __future__ import annotations

from .fitter import PureEraser, PureFitter, SecondMoment
from .reads import head_mean_attention, read_vectors, subsample
from .synthetic import SyntheticStack

__all__ = [
    "PureEraser",
    "PureFitter",
    "SecondMoment",
    "SyntheticStack",
    "head_mean_attention",
    "read_vectors",
    "subsample",
]
