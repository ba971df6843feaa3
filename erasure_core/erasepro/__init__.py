"""ErasePro: zero-residual closed-form edits, progressive from shallow to deep (METHODS.md, ErasePro).

* ``textstages``: the self-attention V projections of the chosen text-encoder blocks, each stage's
  inputs computed through the already-edited earlier stages, ``alpha_b = b / B``;
* ``kvstages``: every cross-attention K and V solved jointly from given K/V inputs (alpha = 1),
  one factorisation per group of layers that share their inputs;
* ``fit``: both on a headless encoder (K/V weights from a plain tensor file) and the patch;
* ``cli``: ``python -m erasure_core fit --method erasepro``.
"""

from __future__ import annotations

from .fit import EraseProFit, fit_headless, kv_inputs_from_rows, to_patch
from .kvstages import KVInputs, KVStageResult, KVWeight, solve_kv_stage
from .textstages import EraseProConfig, TextStagesResult, aligned_tokens, fit_text_stages, stage_alphas

__all__ = [
    "EraseProConfig",
    "EraseProFit",
    "KVInputs",
    "KVStageResult",
    "KVWeight",
    "TextStagesResult",
    "aligned_tokens",
    "fit_headless",
    "fit_text_stages",
    "kv_inputs_from_rows",
    "solve_kv_stage",
    "stage_alphas",
    "to_patch",
]
