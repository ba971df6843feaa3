"""The UCE baseline (METHODS.md, "The shared closed-form solver"), two ways.

Reference formula (UCE as its reference code computes it, once per K/V matrix)::

    W' = (lam W + sum_e v_e c_e^T + sum_k W c_k c_k^T) @ inverse(lam I + sum_e c_e c_e^T + sum_k c_k c_k^T)

with ``c_e`` the target tokens, ``v_e = W a_e`` the values of their aligned anchor tokens,
``c_k`` the tokens to keep. ``uce_reference`` computes exactly that per weight, as UCE's
reference code does (per prompt, per-token outer products summed, explicit inverse, all
rebuilt per weight): it is the speed baseline of ``bench/bench_pure.py``.

``uce_fast`` gives the same edit as a low-rank delta ``Delta = (Y - W X) X^T M^{-1}`` with
``erasure_core.solver``: one Cholesky of ``M`` shared by every weight that reads the same
conditioning (SD/SDXL ``attn2``, Wan ``cross_attn`` read the same text at every layer).
Shapes: ``W``: ``(d_out, d_c)``; ``C_erase``, ``C_anchor``: ``(d_c, n)``; ``C_keep``: ``(d_c, n_k)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import FitError
from ..solver import LowRankDelta, SymmetricSolver, normal_matrix

__all__ = ["uce_fast", "uce_reference"]


@torch.no_grad()
def uce_reference(
    W: torch.Tensor,
    C_erase: torch.Tensor,
    C_anchor: torch.Tensor,
    C_keep: torch.Tensor | None = None,
    *,
    lam: float = 0.1,
    prompt_tokens: int = 77,
) -> torch.Tensor:
    """The edited weight ``W'`` by the reference formula (module docstring), in ``W``'s dtype.

    Computed the way UCE's reference code does it (``train-scripts/train_erase.py``,
    ``edit_model``): prompt by prompt (``prompt_tokens`` columns each), the values
    ``layer(new_emb)`` of the anchor tokens, then per-token outer products summed,
    ``for_mat1 = (v[:, :, None] @ c[:, None, :]).sum(0)``, ``for_mat2 = (c[:, :, None] @
    c[:, None, :]).sum(0)``; kept prompts map to themselves; finally ``mat1 @ inverse(mat2)``.
    """
    d = W.shape[1]
    mat1 = lam * W
    mat2 = lam * torch.eye(d, dtype=W.dtype, device=W.device)
    pairs = [(C_erase, C_anchor)]
    if C_keep is not None and C_keep.numel():
        pairs.append((C_keep, C_keep))
    for C, A in pairs:
        for i in range(0, C.shape[1], prompt_tokens):
            context, value = C[:, i : i + prompt_tokens].T, (W @ A[:, i : i + prompt_tokens]).T  # (T, d), (T, d_out)
            mat1 = mat1 + (value[:, :, None] @ context[:, None, :]).sum(0)
            mat2 = mat2 + (context[:, :, None] @ context[:, None, :]).sum(0)
    return mat1 @ torch.inverse(mat2)


@torch.no_grad()
def uce_fast(
    weights: Mapping[str, torch.Tensor],
    C_erase: torch.Tensor,
    C_anchor: torch.Tensor,
    C_keep: torch.Tensor | None = None,
    *,
    lam: float = 0.1,
    dtype: torch.dtype = torch.float32,
) -> dict[str, LowRankDelta]:
    """``{key: Delta}`` for weights that all read the same conditioning; ``W + Delta`` = ``uce_reference``."""
    X = C_erase.to(dtype)
    Xk = C_keep.to(dtype) if C_keep is not None else None
    if lam <= 0:
        raise FitError(f"lam must be positive, got {lam}")
    B = SymmetricSolver(normal_matrix(X, Xk, lam)).solve(X).T  # (n, d_c), shared by every weight
    D = C_anchor.to(dtype) - X  # Y - W X = W (C_anchor - C_erase)
    return {key: LowRankDelta(W.to(dtype) @ D, B) for key, W in weights.items()}
