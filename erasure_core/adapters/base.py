"""The text-encoder adapter protocol and the per-architecture layouts it shares.

An adapter answers: which blocks are there, how is a text tokenized, run the
encoder, and give me per-block hidden states of the *real* tokens (padding
excluded). Methods in ``erasure_core`` only talk to this protocol; the HF
``transformers`` adapter lives in ``hf.py``, ComfyUI's CLIP objects get theirs in
``patches/``.

Layouts are data: the same relative module names hold for Hugging Face models
and for ComfyUI's copies of them (``clip_l.transformer.`` + HF CLIP names,
``t5xxl.transformer.`` + HF T5 names), so one table serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class EncoderLayout:
    """Where things are inside one text-encoder architecture (names relative to its root).

    ``block``: a block module (format with the block index);
    ``v_proj``: the self-attention value projection *module* of a block;
    ``mlp_out``: the MLP down-projection module (HiRM's supervision point);
    ``causal``: whether attention is causal (CLIP) or bidirectional (T5, BERT).
    """

    kind: str
    block: str
    v_proj: str
    mlp_out: str
    causal: bool

    def block_path(self, i: int) -> str:
        return self.block.format(i=i)

    def v_proj_path(self, i: int) -> str:
        return self.v_proj.format(i=i)

    def mlp_out_path(self, i: int) -> str:
        return self.mlp_out.format(i=i)


LAYOUTS: dict[str, EncoderLayout] = {
    "clip": EncoderLayout(
        "clip",
        "text_model.encoder.layers.{i}",
        "text_model.encoder.layers.{i}.self_attn.v_proj",
        "text_model.encoder.layers.{i}.mlp.fc2",
        causal=True,
    ),
    "t5": EncoderLayout(
        "t5",
        "encoder.block.{i}",
        "encoder.block.{i}.layer.0.SelfAttention.v",
        "encoder.block.{i}.layer.1.DenseReluDense.wo",
        causal=False,
    ),
    "bert": EncoderLayout(
        "bert",
        "encoder.layer.{i}",
        "encoder.layer.{i}.attention.self.value",
        "encoder.layer.{i}.output.dense",
        causal=False,
    ),
}


@dataclass
class EncodedPrompt:
    """One prompt through the encoder: token ids (real tokens only) and hidden states.

    ``hidden[l]``: output of block ``l`` (0-based), ``(T, d)`` float32, real tokens only;
    ``output``: the conditioning the denoiser reads, ``(T, d_c)`` float32.
    """

    ids: list[int]
    hidden: dict[int, torch.Tensor]
    output: torch.Tensor | None = None


@runtime_checkable
class TextEncoderAdapter(Protocol):
    """What every method needs from a text encoder.

    ``root`` is the module the layout's names (and weight keys, after ``key_prefix``)
    are relative to; ``key_prefix`` turns a root-relative parameter name into the key
    an ``ErasurePatch`` stores (``""`` for HF, ``"clip_l.transformer."`` in ComfyUI).
    """

    name: str
    layout: EncoderLayout
    num_blocks: int
    hidden_size: int
    root: nn.Module
    key_prefix: str

    def tokenize(self, text: str) -> list[int]:
        """Real token ids of ``text`` (special tokens included, no padding)."""

    def encode(self, prompts: Sequence[str], blocks: Sequence[int] = ()) -> list[EncodedPrompt]:
        """Run the encoder; hidden states of ``blocks`` and the final output, real tokens only."""


def real_token_rows(hidden: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Split a padded batch ``(B, T, d)`` into per-prompt ``(T_i, d)`` float32 copies using ``mask`` ``(B, T)``."""
    return [hidden[b][mask[b].bool()].float().clone() for b in range(hidden.shape[0])]
