"""ComfyUI CLIP objects as ``erasure_core`` text-encoder adapters.

``ComfyTextEncoder(clip, "t5xxl")`` exposes one encoder of a ``comfy.sd.CLIP`` through
the ``TextEncoderAdapter`` protocol: its blocks (COMFYUI.md §3.3), its tokenizer,
and per-block hidden states of the real tokens, captured with cloned forward hooks
that exist only during one ``encode_from_tokens`` call (§3.2).

Encoder names are the attributes of ``clip.cond_stage_model``: ``clip_l`` (SD1.5,
SDXL, Flux), ``clip_g`` (SDXL), ``t5xxl`` (Flux), ``umt5xxl`` (Wan). Weight keys of the
CLIP patcher are ``<encoder>.transformer.<HF-style name>``, so the HF layouts apply.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from erasure_core.adapters.base import LAYOUTS, EncodedPrompt
from erasure_core.capture import ActivationCapture
from erasure_core.errors import ErasureError

log = logging.getLogger(__name__)

#: encoder attribute -> (layout kind, key of its tokens in ``clip.tokenize`` output)
ENCODERS: dict[str, tuple[str, str]] = {
    "clip_l": ("clip", "l"),
    "clip_g": ("clip", "g"),
    "t5xxl": ("t5", "t5xxl"),
    "umt5xxl": ("t5", "umt5xxl"),
}


def available_encoders(clip: Any) -> list[str]:
    """The encoders a CLIP object holds, in a stable order (``clip_l``, ``clip_g``, ``t5xxl``, ``umt5xxl``)."""
    csm = clip.cond_stage_model
    return [name for name in ENCODERS if isinstance(getattr(csm, name, None), nn.Module)]


def default_encoder(clip: Any) -> str:
    """The encoder whose output the denoiser reads most: T5 where present, else CLIP-G, else CLIP-L."""
    names = available_encoders(clip)
    for name in ("umt5xxl", "t5xxl", "clip_g", "clip_l"):
        if name in names:
            return name
    raise ErasureError("this CLIP object has no text encoder the pack knows (CLIP-L, CLIP-G, T5-XXL, umT5-XXL)")


class ComfyTextEncoder:
    """A ``TextEncoderAdapter`` over one encoder of a ComfyUI CLIP object.

    The adapter reads the CLIP it was given (weights and object patches of that
    CLIP's patcher apply while encoding); it never modifies it.
    """

    def __init__(self, clip: Any, encoder: str | None = None) -> None:
        encoder = encoder or default_encoder(clip)
        names = available_encoders(clip)
        if encoder not in names:
            raise ErasureError(
                f"this CLIP has no {encoder!r} encoder (it has {', '.join(names) or 'none'}); choose one of those"
            )
        kind, self.token_key = ENCODERS[encoder]
        self.clip = clip
        self.name = encoder
        self.layout = LAYOUTS[kind]
        self.wrapper = getattr(clip.cond_stage_model, encoder)  # SDClipModel
        self.root: nn.Module = self.wrapper.transformer
        self.key_prefix = f"{encoder}.transformer."
        self.num_blocks = self._count_blocks()
        config = getattr(self.root, "config", None)
        self.hidden_size = self._hidden_size()
        self._config = config

    def _count_blocks(self) -> int:
        n = 0
        while True:
            try:
                self.root.get_submodule(self.layout.block_path(n))
            except AttributeError:
                return n
            n += 1

    def _hidden_size(self) -> int:
        if self.layout.kind == "clip":
            return int(self.root.text_model.embeddings.token_embedding.weight.shape[1])
        return (
            int(self.root.shared.weight.shape[1])
            if hasattr(self.root, "shared")
            else int(self.root.get_submodule(self.layout.v_proj_path(0)).weight.shape[1])
        )

    def block_path(self, i: int) -> str:
        """Path of block ``i`` relative to the CLIP patcher's model (for ``add_object_patch``)."""
        return self.key_prefix + self.layout.block_path(i)

    def weight_key(self, module_path: str) -> str:
        """CLIP-patcher key of the weight of a root-relative module path."""
        return f"{self.key_prefix}{module_path}.weight"

    def _tokenizer(self) -> Any:
        tok = self.clip.tokenizer
        sub = getattr(tok, self.name, None)
        return sub if sub is not None else getattr(tok, getattr(tok, "clip", ""), None)

    def _real_length(self, pairs: Sequence[Any]) -> int:
        ids = [int(p[0]) for p in pairs]
        tok = self._tokenizer()
        end = getattr(tok, "end_token", None)
        if end is not None and end in ids:
            return ids.index(end) + 1
        pad = getattr(tok, "pad_token", None)
        return ids.index(pad) if pad is not None and pad in ids else len(ids)

    def tokenize(self, text: str) -> list[int]:
        pairs = self.clip.tokenize(text)[self.token_key][0]
        return [int(p[0]) for p in pairs[: self._real_length(pairs)]]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], blocks: Sequence[int] = ()) -> list[EncodedPrompt]:
        """One ``encode_from_tokens`` per prompt, hidden states of ``blocks`` (real tokens, float32, CPU)."""
        results = []
        names = [self.layout.block_path(i) for i in blocks]
        for text in prompts:
            tokens = self.clip.tokenize(text)
            n = self._real_length(tokens[self.token_key][0])
            ids = [int(p[0]) for p in tokens[self.token_key][0][:n]]
            self.clip.load_model()
            if names:
                with ActivationCapture(self.root, names, transform=lambda x, n=n: x[:1, :n].float().cpu()) as cap:
                    out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
                hidden = {i: cap.outputs[nm][0][0] for i, nm in zip(blocks, names)}
            else:
                out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
                hidden = {}
            results.append(EncodedPrompt(ids, hidden, self._output(out, n)))
        return results

    def _output(self, out: dict[str, Any], n: int) -> torch.Tensor:
        """The part of the conditioning this encoder produces, real token rows (``(T, d_c)``)."""
        names = available_encoders(self.clip)
        if self.name == "clip_l" and ("t5xxl" in names or "umt5xxl" in names):
            return out["pooled_output"].float().cpu().reshape(1, -1)  # Flux: CLIP-L only gives the pooled vector
        cond = out["cond"][0].float().cpu()
        if self.name in ("clip_l", "clip_g") and "clip_g" in names:  # SDXL: cond = concat(l, g) on features
            width = self.root.text_model.embeddings.token_embedding.weight.shape[1]
            cond = cond[:, :width] if self.name == "clip_l" else cond[:, -width:]
        return cond[:n]
