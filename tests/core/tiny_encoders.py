"""Tiny random Hugging Face text encoders of the three layouts (CLIP, T5, BERT) for the core tests.

All share a word-level ``BertTokenizer`` over the preset vocabulary (no download, no
network); the models are random ``transformers`` models built from configs.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import torch

from erasure_core.adapters.hf import HFTextEncoder
from erasure_core.prompts import preset_data

EXTRA_WORDS = "dog dogs puppy hound canine animal object painting person cat car tree house nude clothed"


@cache
def _vocab_file() -> str:
    import tempfile

    text = json.dumps(preset_data()) + " " + EXTRA_WORDS
    words = sorted(set(re.findall(r"[a-z0-9]+", text.lower())))
    path = Path(tempfile.mkdtemp(prefix="tiny_vocab_")) / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return str(path)


def tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(_vocab_file())


def tiny_encoder(kind: str, *, seed: int = 0, blocks: int = 3, d: int = 32) -> HFTextEncoder:
    """A random ``kind`` ("clip", "t5", "bert") encoder of ``blocks`` blocks and width ``d`` (float32, CPU)."""
    tok = tokenizer()
    torch.manual_seed(seed)
    v = len(tok)
    if kind == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig(
            vocab_size=v,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=blocks,
            num_attention_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        model = CLIPTextModel(cfg)
    elif kind == "t5":
        from transformers import T5Config, T5EncoderModel

        cfg = T5Config(vocab_size=v, d_model=d, d_ff=2 * d, num_layers=blocks, num_heads=2, d_kv=d // 2)
        model = T5EncoderModel(cfg)
    elif kind == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(
            vocab_size=v,
            hidden_size=d,
            num_hidden_layers=blocks,
            num_attention_heads=2,
            intermediate_size=2 * d,
            max_position_embeddings=64,
        )
        model = BertModel(cfg)
    else:
        raise ValueError(kind)
    return HFTextEncoder(model.eval(), tok, name=f"tiny-{kind}")
