"""PURE's streaming statistics and whitening: ``SecondMoment`` (``S = sum r r^T``) and ``Whitener``.

See ``fitter`` for how they are used (METHODS.md, PURE, step 2).
"""

from __future__ import annotations

import torch

__all__ = ["SecondMoment", "Whitener"]


class SecondMoment:
    """A streaming ``S = sum r r^T`` (``(d, d)``) plus ``sum r`` and the count.

    Kept as an exact factor ``F`` (``S = F F^T``) while its rank stays ``<= cap``; the
    factor is re-compressed by a thin SVD when it grows past ``2 cap`` columns and turned
    into a dense matrix when its rank exceeds ``cap``.
    """

    def __init__(self, dim: int, *, cap: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.dim, self.cap, self.dtype, self.device = dim, cap, dtype, torch.device(device)
        self.factor: torch.Tensor | None = torch.zeros(dim, 0, dtype=dtype, device=self.device) if cap > 0 else None
        self.dense: torch.Tensor | None = None if cap > 0 else torch.zeros(dim, dim, dtype=dtype, device=self.device)
        self.total = torch.zeros(dim, dtype=dtype, device=self.device)
        self.count = 0

    @torch.no_grad()
    def add(self, R: torch.Tensor) -> None:
        """Add the reads ``R`` (``(n, d)``)."""
        R = R.detach().reshape(-1, self.dim).to(self.device, self.dtype)
        self.count += R.shape[0]
        self.total += R.sum(0)
        if self.dense is not None:
            self.dense.addmm_(R.T, R)
            return
        if R.shape[0] > 64:  # exact: R^T R = V S^2 V^T, keep V S
            _, S, Vh = torch.linalg.svd(R, full_matrices=False)
            keep = S > S[0] * 1e-6 if S.numel() else S > 0
            R = Vh[keep] * S[keep, None]
        self.factor = torch.cat([self.factor, R.T], 1)
        if self.factor.shape[1] > 2 * self.cap:
            self._compress()

    def _compress(self) -> None:
        U, S, _ = torch.linalg.svd(self.factor, full_matrices=False)
        keep = S > S[0] * 1e-6 if S.numel() else S > 0
        if int(keep.sum()) > self.cap:
            self.dense = self.factor @ self.factor.T
            self.factor = None
        else:
            self.factor = U[:, keep] * S[keep]

    def matrix(self) -> torch.Tensor:
        """The dense ``S`` (``(d, d)``)."""
        return self.dense if self.dense is not None else self.factor @ self.factor.T

    def mean(self) -> torch.Tensor:
        """The mean read (``(d,)``)."""
        return self.total / max(self.count, 1)

    def nbytes(self) -> int:
        t = self.dense if self.dense is not None else self.factor
        return t.numel() * t.element_size() + self.total.numel() * self.total.element_size()


class Whitener:
    """``B^{-1/2}``-type maps of ``B = S_R / n + eps I`` (``(d, d)``) for the generalized eigenproblem.

    Dense: ``B = L L^T`` (Cholesky), ``whiten(X) = L^-1 X``, ``unwhiten(X) = L^-T X``. Low rank,
    when ``S_R / n = U diag(s) U^T`` has rank ``m << d`` (``U``: ``(d, m)``): the exact symmetric
    ``B^{-1/2} = U diag((s + eps)^-1/2 - eps^-1/2) U^T + eps^-1/2 I`` for both maps, costing
    ``O(d m^2)`` once and ``O(d m k)`` per use instead of the ``O(d^3)`` Cholesky.
    Either way ``whiten(S whiten^T)`` has the generalized eigenvalues ``mu`` and
    ``unwhiten(w)`` maps its eigenvectors back to ``u``.
    """

    def __init__(self, eps: float, L: torch.Tensor | None = None, U: torch.Tensor | None = None, s=None) -> None:
        self.eps, self.L, self.U = eps, L, U
        self.coef = None if U is None else (s + eps).rsqrt() - eps**-0.5

    @property
    def dim(self) -> int:
        return int((self.L if self.L is not None else self.U).shape[0])

    def _sym(self, X: torch.Tensor) -> torch.Tensor:
        return self.U @ (self.coef[:, None] * (self.U.T @ X)) + X * self.eps**-0.5

    def whiten(self, X: torch.Tensor) -> torch.Tensor:
        if self.L is None:
            return self._sym(X)
        return torch.linalg.solve_triangular(self.L, X, upper=False)

    def unwhiten(self, X: torch.Tensor) -> torch.Tensor:
        if self.L is None:
            return self._sym(X)
        return torch.linalg.solve_triangular(self.L.T, X, upper=True)

    def nbytes(self) -> int:
        t = self.L if self.L is not None else self.U
        return t.numel() * t.element_size()
