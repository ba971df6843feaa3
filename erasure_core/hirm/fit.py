"""HiRM: train the first text-encoder block, supervise the last block's MLP output (METHODS.md, HiRM).

With ``h_t`` the output of the last block's MLP down-projection (``layout.mlp_out_path(L-1)``:
CLIP ``fc2``, T5 ``wo``, BERT ``output.dense``), ``(T, d)`` per target prompt, real tokens only::

    HiRM-R:  L = mean_t ||h_t - c r_t||^2     r_t a fixed random unit vector per token
    HiRM-S:  L = mean_t ||h_t - c s_t||^2     s_t the aligned last-layer row of the superordinate prompt, c = 1
    nudity (S): s_t = h0_t + (mu_anchor - mu_target)   the clothed-minus-nude direction, keywords trained jointly

Only block 0's parameters whose names end in ``.weight`` are trained (Adam); biases stay
frozen so that the result is exactly what ComfyUI's stock LoRA loader reads
(``text_encoders.<key>.diff``; it maps ``.weight`` keys only). Prompts are the bare
concept words (METHODS.md). ``c`` for HiRM-R: the paper's 500 for CLIP-L, scaled by the
ratio of this encoder's mean token norm of ``h`` to CLIP-L's (``CLIP_L_H_NORM``, an
estimate: no CLIP-L weights are available offline to measure it); the value used is
recorded. Epochs and learning rates default to the presets of METHODS.md.

The forward pass is differentiable in block 0 only, through ``torch.func.functional_call``
on a ``ForwardSpec`` (which module to call, with what inputs, and how its parameter names
relate to the adapter's root). Inside ComfyUI (inference mode, fp16 weights) the recipe
of COMFYUI.md §3.5 applies: ``inference_mode(False)`` + ``enable_grad`` +
``allow_mutation_on_saved_tensors``, trained parameters as fresh float32 copies, and
float32 inference tensors cloned (fp16/bf16 ones are cast to fresh tensors by the ops).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..adapters.base import TextEncoderAdapter
from ..capture import first_tensor
from ..errors import ConceptRequestError, FitError
from ..patch_file import ErasurePatch, WeightDelta, make_delta, weight_fingerprint
from ..progress import ProgressFn, noop_progress
from ..prompts import ConceptRequest, PromptPair, align_pair, build_prompt_sets

log = logging.getLogger(__name__)

#: (epochs HiRM-R, epochs HiRM-S, learning rate) per preset (METHODS.md; celebrity uses object's)
PRESETS: dict[str, tuple[int, int, float]] = {
    "style": (40, 30, 5e-5),
    "object": (25, 15, 5e-5),
    "celebrity": (25, 15, 5e-5),
    "nudity": (50, 25, 1e-4),
}
#: default superordinate concept per preset (HiRM-S), when the request has no anchor
SUPERORDINATE = {"style": "painting", "object": "object", "celebrity": "person", "nudity": "clothed"}
C_CLIP_L = 500.0
#: estimated mean token norm of CLIP-L's last ``fc2`` output (the scale the paper's c = 500 refers to)
CLIP_L_H_NORM = 20.0


@dataclass(frozen=True)
class HirmConfig:
    """HiRM options; ``None`` means the preset's value. ``compress_rank`` > 0 stores each matrix delta
    as a truncated SVD of that rank (relative error recorded); 0 stores dense deltas."""

    variant: str = "S"
    epochs: int | None = None
    lr: float | None = None
    c: float | None = None
    superordinate: str | None = None
    compress_rank: int = 0

    def __post_init__(self) -> None:
        if self.variant not in ("R", "S"):
            raise FitError(f"HiRM variant must be 'R' (random) or 'S' (superordinate), got {self.variant!r}")
        if self.epochs is not None and self.epochs < 1:
            raise FitError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise FitError(f"lr must be > 0, got {self.lr}")

    def resolved(self, preset: str) -> tuple[int, float]:
        r, s, lr = PRESETS.get(preset, PRESETS["object"])
        return (self.epochs or (r if self.variant == "R" else s)), (self.lr or lr)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ForwardSpec(Protocol):
    """How to run an adapter's encoder differentiably.

    ``module``: what ``functional_call`` runs; ``param_prefix``: ``module`` parameter name =
    ``param_prefix`` + root-relative name; ``inputs(prompts)`` -> ``(args, kwargs, mask)``
    with ``mask`` ``(B, T)`` bool marking real tokens (padding on the right).
    """

    module: nn.Module
    param_prefix: str

    def inputs(self, prompts: Sequence[str]) -> tuple[tuple, dict[str, Any], torch.Tensor]: ...


class HFForward:
    """``ForwardSpec`` of an ``HFTextEncoder``: the model itself on a padded batch."""

    param_prefix = ""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.module = adapter.root

    def inputs(self, prompts: Sequence[str]) -> tuple[tuple, dict[str, Any], torch.Tensor]:
        batch = self.adapter.batch(prompts)
        return (), batch, batch["attention_mask"].bool()


def forward_spec(adapter: TextEncoderAdapter) -> ForwardSpec:
    """The adapter's own ``forward_spec()`` if it has one, else ``HFForward``."""
    spec = getattr(adapter, "forward_spec", None)
    if callable(spec):
        return spec()
    if hasattr(adapter, "batch"):
        return HFForward(adapter)
    raise FitError(f"HiRM cannot run {type(adapter).__name__} differentiably: give the adapter a forward_spec()")


class _Stop(Exception):
    pass


def _frozen(p: torch.Tensor) -> torch.Tensor:
    """A frozen parameter for ``functional_call``: float32 inference tensors are cloned (COMFYUI.md §3.5)."""
    return p.detach().clone() if p.is_inference() and p.dtype == torch.float32 else p.detach()


class BlockZeroTrainer:
    """Runs the encoder with block 0's weights as trainable float32 tensors; returns ``h`` rows."""

    def __init__(self, adapter: TextEncoderAdapter, spec: ForwardSpec) -> None:
        self.adapter, self.spec = adapter, spec
        layout = adapter.layout
        block0 = layout.block_path(0) + "."
        self.h_module = spec.module.get_submodule(spec.param_prefix + layout.mlp_out_path(adapter.num_blocks - 1))
        root_params = dict(adapter.root.named_parameters())
        self.names = [n for n in root_params if n.startswith(block0) and n.endswith(".weight")]
        if not self.names:
            raise FitError(f"block 0 of {adapter.name} has no weights at {block0!r}")
        self.base = {n: root_params[n].detach() for n in self.names}
        for n, w in self.base.items():
            if not torch.isfinite(w).all():
                raise FitError(f"the weight {n} of {adapter.name} contains NaN or infinite values; reload the model")
        with torch.inference_mode(False):
            self.frozen = {
                n: _frozen(p) for n, p in spec.module.named_parameters() if n[len(spec.param_prefix) :] not in self.base
            }
            self.params = {n: w.float().clone().requires_grad_(True) for n, w in self.base.items()}

    def outputs(self, prompts: Sequence[str], params: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``h`` (``(T_i, d)`` float32, real tokens) per prompt; differentiable in ``params``."""
        params = self.params if params is None else params
        args, kwargs, mask = self.spec.inputs(prompts)
        seen: list[torch.Tensor] = []

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            seen.append(first_tensor(output))
            raise _Stop

        handle = self.h_module.register_forward_hook(hook)
        try:
            full = dict(self.frozen)
            full.update({self.spec.param_prefix + n: p for n, p in params.items()})
            torch.func.functional_call(self.spec.module, full, args, kwargs, strict=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not seen:
            raise FitError("the encoder never ran its last block's MLP; the adapter's layout does not match the model")
        h = seen[0].float()
        mask = mask.to(h.device)
        return [h[b, : int(mask[b].sum())] for b in range(h.shape[0])]


@dataclass
class HirmFit:
    """The trained deltas, the loss curve, the value of ``c`` and what it was computed from."""

    deltas: list[WeightDelta]
    losses: list[float]
    c: float
    h_norm: float
    prompts: list[str]
    epochs: int
    lr: float
    compression_error: dict[str, float] = field(default_factory=dict)

    @property
    def loss_drop(self) -> float:
        """``1 - L_last / L_first`` (0.9 = the loss fell by 90 %)."""
        return 1.0 - self.losses[-1] / max(self.losses[0], 1e-30) if self.losses else 0.0


def _targets(
    trainer: BlockZeroTrainer, request: ConceptRequest, config: HirmConfig, seed: int
) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor], float, float]:
    """Prompts, their row selections, the wanted ``h`` rows, ``c`` and the mean token norm of ``h``."""
    prompts = list(request.targets)
    with torch.no_grad():
        h0 = trainer.outputs(prompts, trainer.base)
    for p, h in zip(prompts, h0):
        if h.shape[0] == 0:
            raise ConceptRequestError(f"the target {p!r} tokenizes to nothing; use a word the text encoder knows")
    norm = float(torch.cat(h0).norm(dim=-1).mean().item())
    tokenize = trainer.adapter.tokenize
    rows = [torch.arange(h.shape[0]) for h in h0]
    if config.variant == "R":
        c = config.c if config.c is not None else C_CLIP_L * norm / CLIP_L_H_NORM
        g = torch.Generator().manual_seed(seed)
        wanted = []
        for h in h0:
            r = torch.randn(h.shape, generator=g)
            wanted.append((c * r / r.norm(dim=-1, keepdim=True)).to(h.device))
        return prompts, rows, wanted, c, norm
    c = config.c if config.c is not None else 1.0
    if request.preset == "nudity":
        sets = build_prompt_sets(request)
        with torch.no_grad():
            nude = torch.cat(trainer.outputs(sets.forget[: len(sets.pairs)], trainer.base)).mean(0)
            clothed = torch.cat(trainer.outputs(sets.anchors, trainer.base)).mean(0)
        return prompts, rows, [h + c * (clothed - nude) for h in h0], c, norm
    sup = config.superordinate or request.anchor or SUPERORDINATE.get(request.preset, "object")
    if any(sup.lower() == t.lower() for t in prompts):
        raise ConceptRequestError(f"the superordinate concept {sup!r} equals a target; choose a broader concept")
    with torch.no_grad():
        s0 = trainer.outputs([sup], trainer.base)[0]
    rows, wanted = [], []
    for p in prompts:
        t_ids, a_ids, al = align_pair(tokenize, PromptPair(p, sup, p, sup, "", ""))
        rows.append(al.target_index)
        wanted.append(c * s0[al.anchor_index.to(s0.device)])
    return prompts, rows, wanted, c, norm


def _compress(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, S.numel())
    err = float((S[r:].square().sum().sqrt() / S.square().sum().sqrt().clamp_min(1e-30)).item())
    return (U[:, :r] * S[:r]).float(), Vh[:r].float(), err


def fit_hirm(
    adapter: TextEncoderAdapter,
    request: ConceptRequest,
    *,
    config: HirmConfig = HirmConfig(),
    seed: int = 0,
    spec: ForwardSpec | None = None,
    progress: ProgressFn | None = None,
) -> HirmFit:
    """Train block 0 of ``adapter``'s encoder (the adapter's weights are never changed)."""
    progress = progress or noop_progress
    epochs, lr = config.resolved(request.preset)
    torch.manual_seed(seed)
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.allow_mutation_on_saved_tensors():
        trainer = BlockZeroTrainer(adapter, spec or forward_spec(adapter))
        prompts, rows, wanted, c, norm = _targets(trainer, request, config, seed)
        opt = torch.optim.Adam(list(trainer.params.values()), lr=lr)
        # Adam is scale-free except for its eps: optimise L / scale so tiny activations still train
        scale = max(float(torch.cat(wanted).square().sum(-1).mean().item()), norm**2, 1e-30)
        losses: list[float] = []
        for epoch in range(epochs):
            opt.zero_grad(set_to_none=True)
            hs = trainer.outputs(prompts)
            diff = torch.cat([h[r.to(h.device)] - y for h, r, y in zip(hs, rows, wanted)])
            loss = diff.square().sum(-1).mean()
            if not torch.isfinite(loss):
                raise FitError("the HiRM loss became NaN or infinite; lower the learning rate")
            (loss / scale).backward()
            opt.step()
            losses.append(float(loss.item()))
            progress(epoch + 1, epochs + 1)
        with torch.no_grad():
            hs = trainer.outputs(prompts)
            diff = torch.cat([h[r.to(h.device)] - y for h, r, y in zip(hs, rows, wanted)])
            losses.append(float(diff.square().sum(-1).mean().item()))
        deltas, errors = [], {}
        for n, p in trainer.params.items():
            delta = (p.detach() - trainer.base[n].float()).cpu()
            if not torch.isfinite(delta).all():
                raise FitError(f"the trained delta of {n} is not finite; lower the learning rate")
            key = adapter.key_prefix + n
            if config.compress_rank > 0 and delta.ndim == 2 and config.compress_rank < min(delta.shape):
                up, down, errors[key] = _compress(delta, config.compress_rank)
                deltas.append(make_delta(key, "clip", up, down))
            else:
                deltas.append(WeightDelta(key, "clip", dense=delta.contiguous()))
    progress(epochs + 1, epochs + 1)
    log.info("HiRM-%s: loss %.4g -> %.4g in %d epochs (c = %.4g)", config.variant, losses[0], losses[-1], epochs, c)
    if not math.isfinite(losses[-1]):
        raise FitError("the HiRM loss is not finite")
    return HirmFit(deltas, losses, c, norm, prompts, epochs, lr, errors)


def to_patch(
    fit: HirmFit,
    request: ConceptRequest,
    *,
    config: HirmConfig,
    model_family: str,
    base_weights: dict[str, torch.Tensor],
    metrics: dict[str, Any] | None = None,
    fit_config: dict[str, Any] | None = None,
) -> ErasurePatch:
    """The ``ErasurePatch`` of a HiRM fit (``base_weights``: ``{key: weight}`` of block 0, for fingerprints)."""
    m = {
        "loss_first": fit.losses[0],
        "loss_last": fit.losses[-1],
        "loss_drop": fit.loss_drop,
        "c": fit.c,
        "h_norm": fit.h_norm,
        "epochs": fit.epochs,
        "lr": fit.lr,
        "losses": fit.losses,
    }
    if fit.compression_error:
        m["compression_error"] = fit.compression_error
        m["compression_error_max"] = max(fit.compression_error.values())
    m.update(metrics or {})
    cfg = dict(config.as_dict(), epochs=fit.epochs, lr=fit.lr, c=fit.c, **(fit_config or {}))
    return ErasurePatch(
        method="hirm",
        model_family=model_family,
        deltas=tuple(fit.deltas),
        concept=request.to_dict(),
        fit_config=cfg,
        fingerprint={k: weight_fingerprint(w) for k, w in base_weights.items() if k in {d.key for d in fit.deltas}},
        metrics=m,
    )


def draw_loss(fit: HirmFit, title: str = "HiRM") -> torch.Tensor:
    """The loss curve as an ``(H, W, 3)`` image."""
    from ..report import figure_to_image, new_figure

    fig, ax = new_figure(6.0, 3.5)
    ax.plot(range(len(fit.losses)), fit.losses, marker=".")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (mean squared distance)")
    ax.set_title(f"{title}: loss {fit.losses[0]:.3g} -> {fit.losses[-1]:.3g} ({100 * fit.loss_drop:.1f}% drop)")
    ax.grid(alpha=0.3)
    return figure_to_image(fig)
