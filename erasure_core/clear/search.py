"""CLEAR's layer search and alternating optimisation (METHODS.md, CLEAR steps 2-7).

Input: hidden states of the candidate blocks for the same tokens, normalised per layer
(``x_l = h_l * sqrt(d) / mean ||h_l||``, step 2), stacked as ``x``: ``(L, N, d)``, and a
role per token (positive, paired negative, retain negative).

Each step ``t`` of the search (``tau_t = tau_0 (tau_1 / tau_0)^(t / (T - 1))``, 5 -> 0.1):

(a) ``p ~ GumbelSoftmax(log alpha, tau_t)`` (alpha fixed), ``x = sum_l p_l x_l``, one Adam
    step of the SAE on ``||x - x_hat||^2 (+ l1 ||f||_1)`` over positive and negative tokens;
(b) a fresh ``p`` (differentiable in ``log alpha``), SAE fixed, one Adam step of
    ``log alpha`` on ``L_con = log(1 + S_uni / (S_spe + eps))`` computed from the mean
    feature activations of the positive and the paired negative tokens
    (``sae.soft_separability``).

Then ``l* = argmax alpha``, a short SAE fine-tune on ``x_{l*}`` alone and the final masks
(negatives for the masks = paired negatives + retain prompts, so that features firing
on retain concepts count as shared and are never removed).

Token batches are balanced: up to ``batch_tokens / 2`` positives and as many negatives
per step (all tokens when there are fewer). Every random draw comes from one
``torch.Generator`` seeded by the caller, so a fit is deterministic under its seed on
a given device. With ``amp`` the SAE step runs under bfloat16 autocast on CUDA (the
reconstruction loss tolerates it; the alpha step and the masks stay float32).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import FitError
from .sae import FeatureMasks, SparseAutoencoder, feature_masks, soft_separability

log = logging.getLogger(__name__)

#: token roles in ``LayerData.role``
POSITIVE, NEGATIVE, RETAIN = 1, 0, 2


@dataclass(frozen=True)
class ClearConfig:
    """Options of a CLEAR fit (defaults: METHODS.md; step counts small enough for a CPU fit).

    ``width``: SAE width ``m`` (``None``: ``width_factor * d``); ``topk``: active features
    per token (0: ReLU + ``l1``); ``blocks``: candidate blocks (``None``: all);
    ``eps_shared``/``eps_specific``: firing-rate thresholds of the masks; ``gamma``: the
    default strength stored in the module; ``background``: how many everyday captions
    join the negatives of the masks (``background.py``; 0: none).
    """

    width_factor: int = 8
    width: int | None = None
    topk: int = 8
    l1: float = 0.0
    search_steps: int = 400
    finetune_steps: int = 200
    tau_start: float = 5.0
    tau_end: float = 0.1
    lr_sae: float = 1e-3
    lr_alpha: float = 0.05
    batch_tokens: int = 2048
    mask_every: int = 100
    eps_shared: float = 0.01
    eps_specific: float = 0.02
    loss_eps: float = 1e-8
    gamma: float = 1.0
    blocks: tuple[int, ...] | None = None
    background: int = 64
    amp: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.width_factor >= 1, "width_factor must be >= 1"),
            (self.width is None or self.width >= 1, "width must be >= 1"),
            (self.topk >= 0, "topk must be >= 0 (0 = ReLU with an L1 penalty)"),
            (self.topk > 0 or self.l1 > 0, "a ReLU SAE (topk=0) needs l1 > 0, or features are not sparse"),
            (self.search_steps >= 2 and self.finetune_steps >= 0, "search_steps must be >= 2, finetune_steps >= 0"),
            (self.tau_start > 0 and self.tau_end > 0, "tau_start and tau_end must be positive"),
            (self.batch_tokens >= 2, "batch_tokens must be >= 2"),
            (0 <= self.eps_shared < 1 and 0 <= self.eps_specific < 1, "eps thresholds must be in [0, 1)"),
            (self.gamma >= 0, "gamma must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise FitError(f"invalid CLEAR option: {msg}")

    def sae_width(self, d: int) -> int:
        return int(self.width or self.width_factor * d)

    def tau(self, step: int) -> float:
        """Exponentially annealed temperature at ``step`` of ``search_steps``."""
        frac = step / max(self.search_steps - 1, 1)
        return self.tau_start * (self.tau_end / self.tau_start) ** frac


@dataclass
class LayerData:
    """Normalised hidden states of the candidate blocks for one concept.

    ``x``: ``(L, N, d)`` float32, ``x[l] = h_l / scales[l]``; ``role``: ``(N,)`` int
    (``POSITIVE``, ``NEGATIVE``, ``RETAIN``); ``blocks``: block index of each ``l``.
    """

    x: torch.Tensor
    role: torch.Tensor
    scales: torch.Tensor
    blocks: tuple[int, ...]

    @classmethod
    def from_hidden(cls, hidden: list[torch.Tensor], role: torch.Tensor, blocks: tuple[int, ...]) -> LayerData:
        """Normalise per layer: ``scale_l = mean_tokens ||h_l|| / sqrt(d)``, ``x_l = h_l / scale_l``."""
        h = torch.stack([t.float() for t in hidden])  # (L, N, d)
        d = h.shape[-1]
        scales = h.norm(dim=-1).mean(-1) / math.sqrt(d)
        if not torch.isfinite(scales).all() or (scales <= 0).any():
            raise FitError("hidden states are zero or not finite at some block; check the encoder's weights")
        return cls(h / scales[:, None, None], role.clone(), scales, tuple(blocks))

    def indices(self, role: int) -> torch.Tensor:
        return (self.role == role).nonzero().squeeze(1).to(self.x.device)

    def to(self, device: torch.device | str) -> LayerData:
        return LayerData(self.x.to(device), self.role.to(device), self.scales, self.blocks)


@dataclass
class SearchTrace:
    """What the search recorded: ``probs[i]`` = softmax(log alpha) after step ``steps[i]``."""

    steps: list[int] = field(default_factory=list)
    probs: list[list[float]] = field(default_factory=list)
    tau: list[float] = field(default_factory=list)
    con_loss: list[float] = field(default_factory=list)
    recon_loss: list[float] = field(default_factory=list)
    num_specific: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class SearchResult:
    """The chosen layer, the fine-tuned SAE, its masks, and the per-layer diagnostics."""

    layer: int
    sae: SparseAutoencoder
    masks: FeatureMasks
    log_alpha: torch.Tensor
    trace: SearchTrace
    separability: torch.Tensor
    probe_auc: torch.Tensor


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """``softmax((logits + g) / tau)``, ``g`` standard Gumbel noise drawn from ``generator``."""
    u = torch.rand(logits.shape, generator=generator, device=generator.device).clamp_(1e-10, 1 - 1e-10)
    return torch.softmax((logits - torch.log(-torch.log(u)).to(logits.device)) / tau, dim=-1)


def _sample(idx: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    if idx.numel() <= n:
        return idx
    perm = torch.randperm(idx.numel(), generator=generator, device=generator.device).to(idx.device)
    return idx[perm[:n]]


def _sae_step(sae, opt, x: torch.Tensor, l1: float, amp: bool) -> float:
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp and x.is_cuda):
        loss = sae.loss(x, l1)
    opt.zero_grad(set_to_none=True)
    loss.float().backward()
    opt.step()
    sae.normalize_decoder()
    return float(loss.detach())


@torch.no_grad()
def layer_separability(sae: SparseAutoencoder, data: LayerData, eps: float = 1e-8) -> torch.Tensor:
    """Per-layer ``S_spe / (S_spe + S_uni)`` of positives vs paired negatives with ``sae``: ``(L,)`` in [0, 1]."""
    pos, neg = data.indices(POSITIVE), data.indices(NEGATIVE)
    out = []
    for xl in data.x:
        _, s_spe, s_uni = soft_separability(sae.encode(xl[pos]), sae.encode(xl[neg]), eps)
        out.append(float(s_spe / (s_spe + s_uni + eps)))
    return torch.tensor(out)


@torch.no_grad()
def probe_auc(data: LayerData, max_tokens: int = 2048) -> torch.Tensor:
    """Per-layer AUC of the difference-of-means direction, positives vs paired negatives (SAE-free): ``(L,)``."""
    pos, neg = data.indices(POSITIVE)[:max_tokens], data.indices(NEGATIVE)[:max_tokens]
    out = []
    for xl in data.x:
        w = xl[pos].mean(0) - xl[neg].mean(0)
        sp, sn = xl[pos] @ w, xl[neg] @ w
        out.append(
            float((sp[:, None] > sn[None, :]).float().mean() + 0.5 * (sp[:, None] == sn[None, :]).float().mean())
        )
    return torch.tensor(out)


def search_layer(
    data: LayerData,
    config: ClearConfig,
    *,
    generator: torch.Generator,
    tick: Callable[[], None] | None = None,
) -> SearchResult:
    """Run the search, the fine-tune at ``l*`` and the final masks; ``tick()`` is called once per step."""
    tick = tick or (lambda: None)
    L, N, d = data.x.shape
    pos, neg, ret = data.indices(POSITIVE), data.indices(NEGATIVE), data.indices(RETAIN)
    if pos.numel() == 0 or neg.numel() == 0:
        raise FitError("CLEAR needs positive and negative tokens; the prompt sets gave none of one kind")
    device = data.x.device
    half = max(1, config.batch_tokens // 2)
    sae = SparseAutoencoder(d, config.sae_width(d), topk=config.topk, generator=generator_cpu(generator)).to(device)
    sae.init_decoder_bias(data.x[:, torch.cat([pos, neg])].mean(0))
    log_alpha = torch.zeros(L, device=device, requires_grad=True)
    opt_sae = torch.optim.Adam(sae.parameters(), lr=config.lr_sae)
    opt_alpha = torch.optim.Adam([log_alpha], lr=config.lr_alpha)
    trace = SearchTrace()
    record_every = max(1, config.search_steps // 100)
    for t in range(config.search_steps):
        tau = config.tau(t)
        bp, bn = _sample(pos, half, generator), _sample(neg, half, generator)
        xb = data.x[:, torch.cat([bp, bn])]  # (L, B, d)
        # (a) SAE step, alpha fixed
        p = gumbel_softmax(log_alpha.detach(), tau, generator)
        rec = _sae_step(sae, opt_sae, torch.einsum("l,lbd->bd", p, xb), config.l1, config.amp)
        # (b) alpha step, SAE fixed
        sae.requires_grad_(False)
        p = gumbel_softmax(log_alpha, tau, generator)
        f = sae.encode(torch.einsum("l,lbd->bd", p, xb))
        con, _, _ = soft_separability(f[: bp.numel()], f[bp.numel() :], config.loss_eps)
        opt_alpha.zero_grad(set_to_none=True)
        con.backward()
        opt_alpha.step()
        sae.requires_grad_(True)
        if not math.isfinite(rec) or not torch.isfinite(log_alpha).all():
            raise FitError(f"the CLEAR search diverged at step {t}; lower lr_sae / lr_alpha")
        if t % record_every == 0 or t == config.search_steps - 1:
            trace.steps.append(t)
            trace.probs.append(torch.softmax(log_alpha.detach(), -1).cpu().tolist())
            trace.tau.append(tau)
            trace.con_loss.append(float(con.detach()))
            trace.recon_loss.append(rec)
        if config.mask_every and (t + 1) % config.mask_every == 0:
            mix = torch.einsum("l,lnd->nd", torch.softmax(log_alpha.detach(), -1), data.x)
            m = feature_masks(sae, mix[pos], mix[neg], eps_shared=config.eps_shared, eps_specific=config.eps_specific)
            trace.num_specific.append((t, m.num_specific))
        tick()
    layer = int(torch.argmax(log_alpha.detach()))
    separability = layer_separability(sae, data, config.loss_eps)
    auc = probe_auc(data)
    # fine-tune at l* alone, balanced: positives vs every negative (paired, retain, background)
    x_star = data.x[layer]
    negatives = torch.cat([neg, ret])
    for _ in range(config.finetune_steps):
        batch = torch.cat([_sample(pos, half, generator), _sample(negatives, half, generator)])
        _sae_step(sae, opt_sae, x_star[batch], config.l1, config.amp)
        tick()
    masks = feature_masks(
        sae,
        x_star[pos],
        x_star[torch.cat([neg, ret])],
        eps_shared=config.eps_shared,
        eps_specific=config.eps_specific,
    )
    log.info(
        "CLEAR search: block %d (p=%.3f), %d specific / %d shared features",
        data.blocks[layer],
        float(torch.softmax(log_alpha.detach(), -1)[layer]),
        masks.num_specific,
        masks.num_shared,
    )
    return SearchResult(layer, sae, masks, log_alpha.detach().cpu(), trace, separability, auc)


def generator_cpu(generator: torch.Generator) -> torch.Generator:
    """A CPU generator derived from ``generator`` (SAE initialisation is drawn on the CPU, then moved)."""
    if generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator().manual_seed(seed)
