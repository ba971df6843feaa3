"""Read vectors ``R = A c``: what the image queries read from the text at one attention layer.

``A`` (``(Q, T)``) are the attention probabilities of (a subsample of) the image queries over
the text keys, averaged over heads; ``c`` (``(T, d_c)``) is the K/V input. Computed in the
capture path itself, in chunks of heads, in float32; the model's own attention is untouched.
"""

from __future__ import annotations

import torch

__all__ = ["head_mean_attention", "read_vectors", "subsample"]


def subsample(n: int, q_max: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Indices of at most ``q_max`` of ``n`` queries (sorted), or ``None`` when all are kept."""
    if q_max <= 0 or n <= q_max:
        return None
    return torch.randperm(n, generator=generator)[:q_max].sort().values


def head_mean_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    other_k: torch.Tensor | None = None,
    scale: float | None = None,
    head_chunk: int = 8,
) -> torch.Tensor:
    """``A = mean_h softmax(q_h k_h^T * scale)`` restricted to the keys ``k`` (``(Q, T)``).

    ``q``: ``(H, Q, hd)``; ``k``: ``(H, T, hd)``; ``other_k`` (``(H, T2, hd)``): further keys
    that share the softmax (Flux's image keys in the joint attention) but whose columns are
    dropped, so the rows of ``A`` sum to the attention mass the queries put on ``k``.
    ``scale`` defaults to ``hd ** -0.5``.
    """
    H, Q, hd = q.shape
    scale = hd**-0.5 if scale is None else scale
    T = k.shape[1]
    out = torch.zeros(Q, T, dtype=torch.float32, device=q.device)
    for h0 in range(0, H, head_chunk):
        qh = q[h0 : h0 + head_chunk].float()
        keys = k[h0 : h0 + head_chunk].float()
        if other_k is not None:
            keys = torch.cat([keys, other_k[h0 : h0 + head_chunk].float()], 1)
        logits = torch.baddbmm(
            torch.zeros(1, 1, 1, dtype=torch.float32, device=q.device), qh, keys.transpose(1, 2), alpha=scale
        )
        out += logits.softmax(-1)[:, :, :T].sum(0)
    return out / H


def read_vectors(A: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``R = A c`` (``(Q, d_c)``) in float32."""
    return A.float() @ c.float()
