"""A headless stack of cross-attention layers with random weights (tests, bench, demo).

``SyntheticStack.build(widths, d_c)`` makes one layer per width: ``W_q`` (``(w, w)``), ``W_k``,
``W_v`` (``(w, d_c)``), ``heads = max(1, w // 64)``; ``reads(c)`` draws random image queries
(``(Q, w)``, standard normal) per layer and returns the read vectors ``R = A c`` the layer
would compute from a conditioning ``c`` (``(T, d_c)``), e.g. MiniLM's 384-wide token
embeddings or random tokens. Preset widths: ``SD15_WIDTHS`` (16 layers, 320-1280),
``SDXL_WIDTHS`` (70 layers, 640/1280), ``WAN22_5B_WIDTHS`` (30 x 3072), ``FLUX_WIDTHS``
(19 double blocks x 3072).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .reads import head_mean_attention, read_vectors

SD15_WIDTHS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320)
SDXL_WIDTHS = (640,) * 4 + (1280,) * 20 + (1280,) * 10 + (1280,) * 30 + (640,) * 6
WAN22_5B_WIDTHS = (3072,) * 30
FLUX_WIDTHS = (3072,) * 19
#: ``family: (widths, d_c)`` at real dims (COMFYUI.md §4)
REAL_DIMS = {
    "sd15": (SD15_WIDTHS, 768),
    "sdxl": (SDXL_WIDTHS, 2048),
    "wan22_5b": (WAN22_5B_WIDTHS, 3072),
    "flux": (FLUX_WIDTHS, 3072),
}


@dataclass(frozen=True)
class SyntheticLayer:
    """One cross-attention layer: ``W_q`` (``(w, w)``), ``W_k``/``W_v`` (``(w, d_c)``), ``heads``."""

    name: str
    W_q: torch.Tensor
    W_k: torch.Tensor
    W_v: torch.Tensor
    heads: int

    @property
    def width(self) -> int:
        return self.W_k.shape[0]


@dataclass(frozen=True)
class SyntheticStack:
    """Cross-attention layers reading one ``d_c``-wide conditioning."""

    layers: tuple[SyntheticLayer, ...]
    d_c: int

    @classmethod
    def build(
        cls, widths: Sequence[int], d_c: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> SyntheticStack:
        g = torch.Generator().manual_seed(seed)
        layers = []
        for i, w in enumerate(widths):

            def rnd(*shape: int) -> torch.Tensor:
                return (torch.randn(*shape, generator=g) / shape[1] ** 0.5).to(dtype)

            layers.append(SyntheticLayer(f"layers.{i}.attn2", rnd(w, w), rnd(w, d_c), rnd(w, d_c), max(1, w // 64)))
        return cls(tuple(layers), d_c)

    @classmethod
    def real(cls, family: str, *, seed: int = 0) -> SyntheticStack:
        """The stack at a family's real widths (``REAL_DIMS``)."""
        widths, d_c = REAL_DIMS[family]
        return cls.build(widths, d_c, seed=seed)

    @property
    def dims(self) -> dict[str, int]:
        return {layer.name: self.d_c for layer in self.layers}

    def weights(self) -> dict[str, tuple[str, torch.Tensor]]:
        """``{key: (layer, W)}`` of every K and V weight (keys ``<layer>.to_k.weight``)."""
        out = {}
        for layer in self.layers:
            out[f"{layer.name}.to_k.weight"] = (layer.name, layer.W_k)
            out[f"{layer.name}.to_v.weight"] = (layer.name, layer.W_v)
        return out

    def attention(self, layer: SyntheticLayer, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention probabilities ``A`` (``(Q, T)``) of image tokens ``x`` over ``c``."""
        hd = layer.width // layer.heads
        q = (x @ layer.W_q.T).reshape(x.shape[0], layer.heads, hd).transpose(0, 1)
        k = (c.to(layer.W_k.dtype) @ layer.W_k.T).reshape(c.shape[0], layer.heads, hd).transpose(0, 1)
        return head_mean_attention(q, k)

    @torch.no_grad()
    def reads(self, c: torch.Tensor, *, queries: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
        """``{layer: R}`` with ``R = A c`` (``(queries, d_c)``) for random image queries per layer."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for layer in self.layers:
            x = torch.randn(queries, layer.width, generator=g).to(layer.W_q.dtype)
            out[layer.name] = read_vectors(self.attention(layer, c, x), c)
        return out
