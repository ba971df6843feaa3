"""PURE fitter and eraser: streaming read-vector statistics -> per-layer forget bases -> K/V projectors.

METHODS.md, PURE. At every cross-attention layer ``j`` the image reads ``R = A c`` from the
text (``A``: ``(Q, T)`` attention probabilities averaged over heads, ``c``: ``(T, d_c)`` the
K/V input). ``PureFitter`` accumulates, per layer, the second moments::

    S_R^j   = sum_{retain reads r} r r^T                 (d_c, d_c)
    S_F^j,t = sum_{forget reads r of target t} r r^T     (d_c, d_c), one per target

streaming (``update`` under ``no_grad``; raw reads are never kept), plus the per-target sums
of forget and anchor reads (for the means). ``solve()`` returns an immutable ``PureEraser``:
per layer the orthonormal forget basis ``Q_j`` (``(d_c, r_j)``) from the generalized
eigenproblem (on the per-read means ``S / n``)::

    S_F u = mu (S_R + eps I) u,     eps = eps_scale * mean eigenvalue of the centred S_R (``_eps``)

keeping per target the top ``rank`` eigenvectors with ``mu > threshold``, orthonormalised,
united over targets and re-orthonormalised. The K/V edit is ``W' = W (I - Q Q^T)``, i.e. the
rank-``r`` delta ``-(W Q) Q^T`` stored as the factors ``up = -W Q``, ``down = Q^T``.

Anchor variant (a choice this page fixes, METHODS.md leaves "replaced by the anchor's mean
read vector" open): the removed component is replaced so that the *mean* forget read of
each target maps to the mean anchor read, ``W' f_t = W a_t``. With ``z_t = Q^T f_t`` and
``v_t = a_t - f_t + Q z_t`` (what must be added back after the projection), ``D`` solves
``D z_t = v_t`` for all targets (ridge-regularised least squares, ``(d_c, r)``) and::

    Delta = W (D - Q) Q^T          up = W (D - Q),  down = Q^T        (still rank r)

Numerics: statistics in float32 (``dtype``) on ``device``; the solve uses one whitening of
``B = S_R + eps I`` per layer shared by every target (``Whitener``): a Cholesky factor, or,
when the retain reads span at most ``lowrank_retain * d_c`` directions, the exact symmetric
``B^{-1/2}`` from the eigenpairs of the retain factor's Gram matrix (float64, ``O(d m^2)``
instead of the ``O(d^3)`` Cholesky). The
top eigenvectors of the whitened ``S_F`` come from an exact ``eigh`` when ``d_c`` is small,
else from a randomized block subspace iteration (Halko et al. 2011; ``power_iters`` iterations,
Rayleigh-Ritz at the end), which needs only products with ``k = rank + oversample`` vectors.
A target whose reads span few directions is kept as an exact factor ``F`` (``S = F F^T``,
``(d_c, m)``, ``m <= factor_cap``) instead of a dense matrix, which keeps 100-target fits
small. ``finish_target(t)`` solves one target early and frees its statistics (retain
statistics are then frozen), so many targets at real widths fit in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import FitError
from .stats import SecondMoment, Whitener

log = logging.getLogger(__name__)

__all__ = ["PureEraser", "PureFitter", "SecondMoment", "Whitener"]


@dataclass(frozen=True)
class PureEraser:
    """The result of a PURE fit: per-layer orthonormal bases and the anchor maps.

    ``bases[layer]``: ``Q`` (``(d_c, r)``, orthonormal columns; ``r`` may be 0);
    ``anchor_maps[layer]``: ``D`` (``(d_c, r)``) of the anchor variant, absent without anchor;
    ``mus[layer]``: generalized eigenvalues kept, per target (for the report);
    ``energy[layer]``: fraction of the forget read energy inside the basis (mean over targets).
    """

    bases: Mapping[str, torch.Tensor]
    anchor_maps: Mapping[str, torch.Tensor] = field(default_factory=dict)
    mus: Mapping[str, list[list[float]]] = field(default_factory=dict)
    energy: Mapping[str, float] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.bases)

    def rank(self, layer: str) -> int:
        return int(self.bases[layer].shape[1])

    def projector(self, layer: str) -> torch.Tensor:
        """``P = I - Q Q^T`` (``(d_c, d_c)``)."""
        Q = self.bases[layer]
        return torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device) - Q @ Q.T

    def __call__(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        """Read vectors with the forget component removed: ``x - (x Q) Q^T`` (``(..., d_c)``)."""
        Q = self.bases[layer].to(x.device, x.dtype)
        return x - (x @ Q) @ Q.T

    def delta(self, layer: str, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``(up, down)`` of the K/V delta for ``W`` (``(d_out, d_c)``): ``Delta = up @ down``.

        ``up = W (D - Q)`` (``-W Q`` without anchor), ``down = Q^T``; float32, on ``W``'s device.
        """
        Q = self.bases[layer].to(W.device, torch.float32)
        Wf = W.detach().to(torch.float32)
        D = self.anchor_maps.get(layer)
        M = -Q if D is None else D.to(W.device, torch.float32) - Q
        return Wf @ M, Q.T.clone(memory_format=torch.contiguous_format)

    def deltas(self, weights: Mapping[str, tuple[str, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{key: (layer, W)}`` -> ``{key: (up, down)}`` for every key whose layer has a non-empty basis."""
        out = {}
        for key, (layer, W) in weights.items():
            if layer in self.bases and self.rank(layer) > 0:
                out[key] = self.delta(layer, W)
        return out

    def to(self, device: torch.device | str) -> PureEraser:
        return PureEraser(
            {k: v.to(device) for k, v in self.bases.items()},
            {k: v.to(device) for k, v in self.anchor_maps.items()},
            self.mus,
            self.energy,
        )


class PureFitter:
    """Streaming statistics of read vectors per layer; ``solve()`` -> ``PureEraser``.

    ``layers``: ``{layer name: d_c}``; ``rank``: eigenvectors kept per target and layer (<= 8
    by default); ``threshold``: minimum generalized eigenvalue ``mu`` (mean forget energy over
    mean retain energy + eps along ``u``; 1 = as common in retain as in forget);
    ``eps_scale``: ``eps = eps_scale * trace(S_R / n_R - mu mu^T) / d_c``; ``factor_cap``: largest rank
    kept as an exact factor (default ``d_c // 2``); ``exact_below``: widths up to which the
    whitened eigenproblem is solved exactly with ``eigh``; ``lowrank_retain``: largest retain
    rank, as a fraction of ``d_c``, whitened without a Cholesky (0: always Cholesky).
    """

    def __init__(
        self,
        layers: Mapping[str, int],
        *,
        rank: int = 8,
        threshold: float = 10.0,
        eps_scale: float = 1e-3,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        factor_cap: int | None = None,
        exact_below: int = 512,
        oversample: int = 8,
        power_iters: int = 2,
        seed: int = 0,
        lowrank_retain: float = 0.25,
    ) -> None:
        if not layers:
            raise FitError("no cross-attention layers to fit: the model has no K/V weights PURE can edit")
        if rank < 1:
            raise FitError(f"rank must be at least 1, got {rank}")
        self.dims = dict(layers)
        self.rank, self.threshold, self.eps_scale = rank, threshold, eps_scale
        self.dtype, self.device = dtype, torch.device(device)
        self.factor_cap, self.exact_below = factor_cap, exact_below
        self.oversample, self.power_iters, self.seed = oversample, power_iters, seed
        self.lowrank_retain = lowrank_retain
        self.retain = {name: self._moment(name) for name in self.dims}
        self.forget: dict[int, dict[str, SecondMoment]] = {}
        self.anchor: dict[int, dict[str, SecondMoment]] = {}
        self._solved: dict[int, dict[str, tuple[torch.Tensor, list[float], torch.Tensor, float]]] = {}
        self._chol: dict[str, Whitener] = {}

    def _moment(self, layer: str, cap: int | None = None) -> SecondMoment:
        d = self.dims[layer]
        c = self.factor_cap if self.factor_cap is not None else d // 2
        return SecondMoment(d, cap=c if cap is None else cap, dtype=self.dtype, device=self.device)

    def _check(self, layer: str, R: torch.Tensor) -> None:
        if layer not in self.dims:
            raise FitError(f"unknown layer {layer!r}; the fitter was built for {len(self.dims)} layers")
        if R.shape[-1] != self.dims[layer]:
            raise FitError(f"reads at {layer!r} have width {R.shape[-1]}, expected {self.dims[layer]}")

    @torch.no_grad()
    def update(self, layer: str, R: torch.Tensor, forget: bool, *, target: int = 0) -> None:
        """Add read vectors ``R`` (``(..., d_c)``) of a forget prompt of ``target`` or of a retain prompt."""
        self._check(layer, R)
        if forget:
            if target in self._solved:
                raise FitError(f"target {target} was already finished; give its reads before finish_target")
            self.forget.setdefault(target, {}).setdefault(layer, self._moment(layer)).add(R)
        else:
            if self._chol:
                raise FitError("retain reads must all come before finish_target (the retain statistics are frozen)")
            self.retain[layer].add(R)

    @torch.no_grad()
    def update_anchor(self, layer: str, R: torch.Tensor, *, target: int = 0) -> None:
        """Add read vectors of an anchor prompt of ``target`` (only their mean is kept)."""
        self._check(layer, R)
        moments = self.anchor.setdefault(target, {})
        if layer not in moments:
            moments[layer] = self._moment(layer, cap=1)
        m = moments[layer]
        R = R.detach().reshape(-1, m.dim).to(self.device, self.dtype)
        m.total += R.sum(0)
        m.count += R.shape[0]

    def memory_bytes(self) -> int:
        """Bytes held by the statistics and the cached factorisations."""
        n = sum(m.nbytes() for m in self.retain.values())
        n += sum(m.nbytes() for t in self.forget.values() for m in t.values())
        n += sum(w.nbytes() for w in self._chol.values())
        return n

    # ------------------------------------------------------------------ solve
    def _eps(self, trace: float, m: SecondMoment) -> float:
        """``eps = eps_scale * trace(S_R / n - mu mu^T) / d``: the *centred* retain energy per dimension.

        METHODS.md says 1e-3 of the mean eigenvalue of ``S_R``; a read that is the same for
        every prompt (Wan's 512-token padded context reads mostly the padding's constant
        embedding) dominates that uncentred trace and lifts ``eps`` over a concept's whole
        signal; centring removes it. Floored at 1e-4 of the uncentred trace (constant reads).
        """
        centred = max(trace - float(m.mean().pow(2).sum()), 1e-4 * trace)
        return max(self.eps_scale * centred / m.dim, 1e-12)

    def _whitener(self, layer: str) -> Whitener:
        """The whitening of ``S_R / n + eps I`` (cached per layer): low rank when the retain factor is small."""
        if layer not in self._chol:
            m = self.retain[layer]
            if m.count == 0:
                raise FitError(
                    f"no retain reads at {layer!r}: PURE needs retain prompts to tell the concept from "
                    "everything else; add retain concepts (or keep the preset's)"
                )
            d = m.dim
            if m.factor is not None and m.factor.shape[1] <= self.lowrank_retain * d:
                F = m.factor.double() / m.count**0.5  # S_R / n = F F^T; eigenpairs from the Gram F^T F
                lam, V = torch.linalg.eigh(F.T @ F)
                floor = max(1e-4 * self.eps_scale * float(lam.clamp_min(0).sum()) / d, float(lam[-1]) * 1e-10)
                keep = lam > floor  # directions far below eps change B by < 1e-4 of eps
                if 0 < int(keep.sum()) <= self.lowrank_retain * d:
                    lam, V = lam[keep], V[:, keep]
                    U = (F @ (V / lam.sqrt())).to(self.dtype)
                    eps = self._eps(float(lam.sum()), m)
                    self._chol[layer] = Whitener(eps, U=U, s=lam.to(self.dtype))
                    return self._chol[layer]
            S = m.matrix() / m.count
            eps = self._eps(float(torch.trace(S)), m)
            B = S + eps * torch.eye(d, dtype=S.dtype, device=S.device)
            L, info = torch.linalg.cholesky_ex(B)
            jitter = eps
            while int(info) != 0:
                jitter *= 10
                L, info = torch.linalg.cholesky_ex(B + jitter * torch.eye(d, dtype=S.dtype, device=S.device))
            self._chol[layer] = Whitener(eps, L=L)
        return self._chol[layer]

    def _top(self, layer: str, m: SecondMoment, gen: torch.Generator) -> tuple[torch.Tensor, list[float]]:
        """Top generalized eigenvectors ``U`` (``(d, <= rank)``, orthonormalised) with ``mu > threshold``."""
        wh = self._whitener(layer)
        whiten, unwhiten = wh.whiten, wh.unwhiten
        d = wh.dim
        scale = 1.0 / max(m.count, 1)

        k = min(d, self.rank + self.oversample)
        if m.factor is not None and m.factor.shape[1] <= max(k, 64):
            Y = whiten(m.factor * scale**0.5)  # exact: M = Y Y^T, eigenpairs from the small Gram Y^T Y
            mu, V = torch.linalg.eigh(Y.T @ Y)
            mu, V = mu.flip(0), V.flip(1)
            W = Y @ (V / mu.clamp_min(1e-30).sqrt())
        elif d <= self.exact_below:
            S = m.matrix() * scale
            M = whiten(whiten(S).T).T
            mu, W = torch.linalg.eigh((M + M.T) / 2)
            mu, W = mu.flip(0), W.flip(1)
        else:

            def apply(X: torch.Tensor) -> torch.Tensor:  # M X = L^-1 S L^-T X
                Z = unwhiten(X)
                Z = m.dense @ Z if m.dense is not None else m.factor @ (m.factor.T @ Z)
                return whiten(Z) * scale

            Y = apply(torch.randn(d, k, generator=gen, dtype=self.dtype).to(self.device))
            for _ in range(self.power_iters):
                Y = apply(torch.linalg.qr(Y)[0])
            Qy = torch.linalg.qr(Y)[0]
            T = Qy.T @ apply(Qy)
            mu, V = torch.linalg.eigh((T + T.T) / 2)
            mu, W = mu.flip(0), Qy @ V.flip(1)
        keep = (mu[: self.rank] > self.threshold).nonzero().flatten()
        if keep.numel() == 0:
            return torch.zeros(d, 0, dtype=self.dtype, device=self.device), []
        U = unwhiten(W[:, keep])
        return torch.linalg.qr(U)[0], [float(x) for x in mu[keep]]

    def finish_target(self, target: int) -> None:
        """Solve ``target``'s bases now and free its forget statistics (freezes the retain statistics)."""
        moments = self.forget.pop(target, None)
        if moments is None:
            raise FitError(f"no forget reads for target {target}; capture its prompts first")
        gen = torch.Generator().manual_seed(self.seed + target)
        out = {}
        for layer, m in moments.items():
            U, mus = self._top(layer, m, gen)
            out[layer] = (U, mus, m.mean(), _energy_inside(U, m))
        self._solved[target] = out

    def solve(self) -> PureEraser:
        """Finish every target, unite the per-target bases per layer and return the ``PureEraser``."""
        for t in sorted(self.forget):
            self.finish_target(t)
        if not self._solved:
            raise FitError("no forget reads were given: capture the forget prompts before solving")
        bases, maps, mus, energy = {}, {}, {}, {}
        for layer, d in self.dims.items():
            parts = [s[layer] for s in self._solved.values() if layer in s]
            Q = _unite([p[0] for p in parts], d, self.dtype, self.device)
            bases[layer] = Q
            mus[layer] = [p[1] for p in parts]
            energy[layer] = sum(p[3] for p in parts) / len(parts) if parts else 0.0
            D = self._anchor_map(layer, Q)
            if D is not None:
                maps[layer] = D
        ranks = [Q.shape[1] for Q in bases.values()]
        log.info("PURE bases: %d layers, rank %d..%d", len(ranks), min(ranks), max(ranks))
        return PureEraser(bases, maps, mus, energy)

    def _anchor_map(self, layer: str, Q: torch.Tensor) -> torch.Tensor | None:
        """``D`` with ``D z_t ~= a_t - f_t + Q z_t`` for the targets that have anchor reads (module docstring)."""
        cols_z, cols_v = [], []
        for t, solved in self._solved.items():
            a = self.anchor.get(t, {}).get(layer)
            if a is None or a.count == 0 or layer not in solved:
                continue
            f = solved[layer][2]
            z = Q.T @ f
            cols_z.append(z)
            cols_v.append(a.mean() - f + Q @ z)
        if not cols_z or Q.shape[1] == 0:
            return None
        Z, V = torch.stack(cols_z, 1).double(), torch.stack(cols_v, 1).double()
        G = Z @ Z.T
        ridge = 1e-3 * float(torch.trace(G)) / max(G.shape[0], 1) + 1e-12
        D = torch.linalg.solve(G + ridge * torch.eye(G.shape[0], dtype=G.dtype, device=G.device), Z @ V.T).T
        return D.to(self.dtype)


def _unite(bases: Iterable[torch.Tensor], d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Orthonormal basis of the union of the columns of ``bases`` (near-dependent directions merged)."""
    cols = [B for B in bases if B.shape[1]]
    if not cols:
        return torch.zeros(d, 0, dtype=dtype, device=device)
    if len(cols) == 1:
        return cols[0].to(dtype)
    U, S, _ = torch.linalg.svd(torch.cat(cols, 1), full_matrices=False)
    return U[:, S > 1e-4 * S[0]].to(dtype).contiguous()


def _energy_inside(U: torch.Tensor, m: SecondMoment) -> float:
    """Fraction of the forget energy ``trace(S)`` inside ``span(U)`` (``U`` orthonormal)."""
    if m.factor is not None:
        total, inside = float((m.factor**2).sum()), float(((U.T @ m.factor) ** 2).sum())
    else:
        total, inside = float(torch.trace(m.dense)), float(torch.trace(U.T @ m.dense @ U))
    return inside / total if total > 0 else 0.0
