"""ErasePro's denoiser stage: every cross-attention K and V solved jointly, zero residual (METHODS.md, ErasePro).

For each K/V weight ``W`` (``(d_out, d_c)``) reading inputs of group ``g`` (the text the
cross-attention reads: the conditioning for SD/SDXL, ``text_embedding(c)`` for Wan, the
per-double-block modulated text stream for Flux), with ``X_t`` (``(d_c, n)``, target
tokens through the already-edited text encoder), ``X_a`` (aligned anchor tokens through
the original model) and ``X_r`` (``(d_c, n_r)``, retain tokens)::

    Y = (1 - alpha) W X_t + alpha W X_a                      (alpha = 1: the last stage)
    V_k: right singular vectors of X_t with s_i > tol * s_1   Xc = X_t V_k,  Yc = Y V_k
    M = X_r X_r^T + lam I,   G = Xc^T M^{-1} Xc
    Delta = (Yc - W Xc) G^{-1} (M^{-1} Xc)^T                 A = (Yc - W Xc) G^{-1},  B = (M^{-1} Xc)^T

Layers that read the same inputs (every layer of SD/SDXL/Wan) share ``V_k``, the
Cholesky factor of ``M`` and that of ``G``: one factorisation per group, then one small
solve per weight. ``lam`` is relative: ``lam_rel`` times the mean eigenvalue of
``X_r X_r^T`` (of ``X_t X_t^T`` without retain tokens), so it does not depend on the
activations' scale.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import FitError
from ..patch_file import WeightDelta, make_delta
from ..progress import ProgressFn, noop_progress
from ..solver import LowRankDelta, ResidualReport, SymmetricSolver, compress_columns, normal_matrix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVWeight:
    """One K or V weight (slice) of the denoiser: its key, base weight ``(d_out, d_c)`` and input group."""

    key: str
    W: torch.Tensor
    group: str
    offset: tuple[int, int, int] | None = None
    lora_name: str | None = None


@dataclass(frozen=True)
class KVInputs:
    """Inputs of one group: ``X_t``, ``X_a`` (``(d_c, n)``, aligned columns) and ``X_r`` (``(d_c, n_r)``)."""

    X_t: torch.Tensor
    X_a: torch.Tensor
    X_r: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.X_t.shape != self.X_a.shape:
            raise FitError(
                f"target inputs {tuple(self.X_t.shape)} and anchor inputs {tuple(self.X_a.shape)} must have the "
                "same shape (one aligned column per token)"
            )
        if self.X_t.shape[1] == 0:
            raise FitError("no target tokens reach the cross-attention: the targets tokenize to nothing")


@dataclass
class KVStageResult:
    """Deltas (``target="model"``), residuals per key and the relative change of retain outputs per key."""

    deltas: list[WeightDelta]
    reports: dict[str, ResidualReport] = field(default_factory=dict)
    retain_change: dict[str, float] = field(default_factory=dict)

    @property
    def max_kept_residual(self) -> float:
        return max((r.kept_residual for r in self.reports.values()), default=0.0)

    @property
    def max_retain_change(self) -> float:
        return max(self.retain_change.values(), default=0.0)


def relative_lam(X_r: torch.Tensor | None, X_t: torch.Tensor, lam_rel: float) -> float:
    """``lam_rel`` times the mean eigenvalue of ``X_r X_r^T`` (``X_t X_t^T`` when there is no retain token)."""
    X = X_r if X_r is not None and X_r.numel() else X_t
    mean_eig = float((X.double() ** 2).sum().item()) / X.shape[0]
    return max(lam_rel * mean_eig, 1e-12)


class SharedConstraint:
    """The factorisations one group of layers shares: ``V_k``, ``M`` (Cholesky), ``G`` (Cholesky)."""

    def __init__(self, inputs: KVInputs, *, lam_rel: float, tol: float, dtype: torch.dtype, device) -> None:
        X_t = inputs.X_t.to(device, dtype)
        X_a = inputs.X_a.to(device, dtype)
        X_r = inputs.X_r.to(device, dtype) if inputs.X_r is not None else X_t.new_zeros(X_t.shape[0], 0)
        for name, t in (("target inputs", X_t), ("anchor inputs", X_a), ("retain inputs", X_r)):
            if not torch.isfinite(t).all():
                raise FitError(f"the {name} of the cross-attention contain NaN or infinite values; the model is broken")
        self.X_t, self.X_a, self.X_r = X_t, X_a, X_r
        self.Vk, self.energy_outside = compress_columns(X_t, tol)
        self.Xc, self.Xac = X_t @ self.Vk, X_a @ self.Vk
        self.lam = relative_lam(X_r, X_t, lam_rel)
        self.solver = SymmetricSolver(normal_matrix(X_r, None, self.lam))
        self.MinvX = self.solver.solve(self.Xc)
        G = self.Xc.T @ self.MinvX
        self.G = SymmetricSolver((G + G.T) / 2)

    def solve(self, W: torch.Tensor, alpha: float) -> tuple[LowRankDelta, ResidualReport, float]:
        """The delta of one weight reading these inputs, its residuals and its relative retain change."""
        W = W.to(self.Xc.device, self.Xc.dtype)
        if not torch.isfinite(W).all():
            raise FitError("a K/V weight contains NaN or infinite values; the model weights are broken")
        WXc = W @ self.Xc
        Yc = WXc + alpha * (W @ self.Xac - WXc)
        A = self.G.solve((Yc - WXc).T).T
        B = self.MinvX.T
        if not torch.isfinite(A).all():
            raise FitError("the K/V solve produced non-finite numbers; lower the tolerance or add retain prompts")

        def rel(X: torch.Tensor, target: torch.Tensor) -> float:
            out = W @ X + A @ (B @ X)
            return float((torch.linalg.norm(out - target) / torch.linalg.norm(target).clamp_min(1e-30)).item())

        Y = W @ self.X_t + alpha * (W @ (self.X_a - self.X_t))
        report = ResidualReport(rel(self.Xc, Yc), rel(self.X_t, Y), self.energy_outside, self.Vk.shape[1], Y.shape[1])
        retain = 0.0
        if self.X_r.shape[1]:
            base = torch.linalg.norm(W @ self.X_r).clamp_min(1e-30)
            retain = float((torch.linalg.norm(A @ (B @ self.X_r)) / base).item())
        return LowRankDelta(A, B), report, retain


def solve_kv_stage(
    weights: Sequence[KVWeight],
    inputs: dict[str, KVInputs],
    *,
    alpha: float = 1.0,
    lam_rel: float = 1e-3,
    tol: float = 1e-3,
    dtype: torch.dtype = torch.float64,
    progress: ProgressFn | None = None,
) -> KVStageResult:
    """Zero-residual deltas of every K/V weight; one ``SharedConstraint`` per input group.

    Deltas are stored as factors ``up = A`` (``(d_out, k)``), ``down = B`` (``(k, d_c)``) in
    float32 (dense where that is smaller, ``make_delta``), keyed by ``KVWeight.key``.
    """
    progress = progress or noop_progress
    if not weights:
        raise FitError("no cross-attention K/V weights to edit")
    missing = sorted({w.group for w in weights} - set(inputs))
    if missing:
        raise FitError(f"no K/V inputs were captured for {', '.join(missing[:3])}")
    result = KVStageResult([])
    shared: dict[str, SharedConstraint] = {}
    for i, w in enumerate(weights):
        if w.group not in shared:
            shared[w.group] = SharedConstraint(
                inputs[w.group], lam_rel=lam_rel, tol=tol, dtype=dtype, device=w.W.device
            )
        delta, report, retain = shared[w.group].solve(w.W, alpha)
        ident = w.key if w.offset is None else f"{w.key}@{w.offset[1]}"
        result.reports[ident] = report
        result.retain_change[ident] = retain
        result.deltas.append(
            make_delta(
                w.key, "model", delta.A.float().cpu(), delta.B.float().cpu(), offset=w.offset, lora_name=w.lora_name
            )
        )
        progress(i + 1, len(weights))
    log.info(
        "ErasePro K/V stage: %d weights, %d groups, max kept residual %.2e, max retain change %.2e",
        len(weights),
        len(shared),
        result.max_kept_residual,
        result.max_retain_change,
    )
    return result
