"""The sparse autoencoder CLEAR decomposes hidden states with (METHODS.md, CLEAR step 4).

::

    f     = act(W_enc (x - b_dec) + b_enc)        W_enc: (m, d), b_enc: (m,)
    x_hat = W_dec f + b_dec                       W_dec: (d, m), b_dec: (d,)

``act`` is TopK (keep the ``k`` largest pre-activations of each token, then ReLU;
the default, ``k = 8``) or ReLU with an L1 penalty (``topk = 0``). Decoder columns
are kept at unit norm (``normalize_decoder`` after every optimiser step), so a
feature's activation is the length of its direction in ``x``.

Masks (step 5): with ``phi_pos``/``phi_neg`` the firing rates of each feature on
positive/negative tokens, ``m_shared = [phi_neg > eps_s]`` and
``m_spec = [phi_neg <= eps_s] * [phi_pos > eps_p]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest entries of each row of ``pre`` (``(N, m)``), ReLU them, zero the rest."""
    if k <= 0 or k >= pre.shape[-1]:
        return torch.relu(pre)
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))


class SparseAutoencoder(nn.Module):
    """A TopK (``topk > 0``) or ReLU (``topk = 0``) SAE of width ``m`` on ``d``-dimensional inputs."""

    def __init__(self, d: int, m: int, *, topk: int = 8, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if d <= 0 or m <= 0:
            raise ValueError(f"SAE sizes must be positive, got d={d}, m={m}")
        self.d, self.m, self.topk = d, m, int(topk)
        W_dec = torch.randn(d, m, generator=generator)
        W_dec /= W_dec.norm(dim=0, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``W_enc (x - b_dec) + b_enc``: ``(N, d) -> (N, m)``."""
        return (x - self.b_dec) @ self.W_enc.t() + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``f``: ``(N, d) -> (N, m)``, non-negative."""
        return topk_relu(self.pre_activation(x), self.topk)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """``W_dec f + b_dec``: ``(N, m) -> (N, d)``."""
        return f @ self.W_dec.t() + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def loss(self, x: torch.Tensor, l1: float = 0.0) -> torch.Tensor:
        """``mean ||x - x_hat||^2 (+ l1 mean ||f||_1)`` over the tokens of ``x``."""
        x_hat, f = self(x)
        loss = (x - x_hat).pow(2).sum(-1).mean()
        if l1 > 0:
            loss = loss + l1 * f.abs().sum(-1).mean()
        return loss

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder column to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def init_decoder_bias(self, x: torch.Tensor) -> None:
        """``b_dec`` = the mean of ``x`` (``(N, d)``), so features start centred on the data."""
        self.b_dec.copy_(x.mean(0))


@dataclass(frozen=True)
class FeatureMasks:
    """Firing rates and the hard masks derived from them (all ``(m,)``)."""

    phi_pos: torch.Tensor
    phi_neg: torch.Tensor
    shared: torch.Tensor
    specific: torch.Tensor

    @property
    def num_specific(self) -> int:
        return int(self.specific.sum())

    @property
    def num_shared(self) -> int:
        return int(self.shared.sum())


@torch.no_grad()
def firing_rate(sae: SparseAutoencoder, x: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
    """Fraction of the tokens of ``x`` (``(N, d)``) on which each feature fires (``f > 0``): ``(m,)``."""
    if x.shape[0] == 0:
        return torch.zeros(sae.m, device=x.device)
    counts = torch.zeros(sae.m, device=x.device)
    for i in range(0, x.shape[0], chunk):
        counts += (sae.encode(x[i : i + chunk]) > 0).float().sum(0)
    return counts / x.shape[0]


def feature_masks(
    sae: SparseAutoencoder, x_pos: torch.Tensor, x_neg: torch.Tensor, *, eps_shared: float, eps_specific: float
) -> FeatureMasks:
    """``m_shared = [phi_neg > eps_s]``, ``m_spec = [phi_neg <= eps_s] * [phi_pos > eps_p]``."""
    phi_pos, phi_neg = firing_rate(sae, x_pos), firing_rate(sae, x_neg)
    shared = phi_neg > eps_shared
    specific = ~shared & (phi_pos > eps_specific)
    return FeatureMasks(phi_pos.cpu(), phi_neg.cpu(), shared.cpu(), specific.cpu())


def soft_separability(f_pos: torch.Tensor, f_neg: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, ...]:
    """The soft loss of METHODS.md step 6(b), differentiable in both activation sets.

    With ``a_pos``/``a_neg`` the mean feature activations (``(m,)``) of ``f_pos`` (``(N_p, m)``)
    and ``f_neg`` (``(N_n, m)``)::

        S_spe = ||relu(a_pos - a_neg)||^2,  S_uni = ||min(a_pos, a_neg)||^2
        L_con = log(1 + S_uni / (S_spe + eps))

    Returns ``(L_con, S_spe, S_uni)``.
    """
    a_pos, a_neg = f_pos.mean(0), f_neg.mean(0)
    s_spe = torch.relu(a_pos - a_neg).pow(2).sum()
    s_uni = torch.minimum(a_pos, a_neg).pow(2).sum()
    return torch.log1p(s_uni / (s_spe + eps)), s_spe, s_uni
