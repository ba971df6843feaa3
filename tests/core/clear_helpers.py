"""Synthetic encoders for the CLEAR tests: a planted-layer encoder and a tiny random BERT on disk."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import torch
from torch import nn

from erasure_core.adapters.base import LAYOUTS, EncodedPrompt
from erasure_core.capture import ActivationCapture


class _Block(nn.Module):
    """Block ``i``: a context-free token table, plus fixed per-prompt noise (ignores its input)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        self.value = nn.Linear(table.shape[1], table.shape[1], bias=False)  # for fingerprints

    def forward(self, x: torch.Tensor | None, ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.table[ids] + noise


class _Root(nn.Module):
    def __init__(self, tables: list[torch.Tensor]) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([_Block(t) for t in tables])

    def forward(self, ids: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
        x = None
        for blk, n in zip(self.encoder.layer, noise):
            x = blk(x, ids, n)
        return x


class PlantedEncoder:
    """A ``TextEncoderAdapter`` in which ``concept`` differs from ``anchor`` only at block ``planted``.

    Words are tokens. At every block ``l`` a token's hidden state is ``T_l[word] * (1 + l)``
    plus small noise fixed per prompt; the concept word uses the anchor's row. A direction
    ``u_l`` is added to both the concept and the anchor token at every block except
    ``planted``, where only the concept token has it: positives and negatives are identically
    distributed everywhere else (METHODS.md's planted prototype).
    """

    layout = LAYOUTS["bert"]
    key_prefix = ""

    def __init__(
        self,
        seed: int,
        *,
        blocks: int = 6,
        d: int = 16,
        planted: int = 3,
        concept: str = "zebra",
        anchor: str = "horse",
    ) -> None:
        g = torch.Generator().manual_seed(1000 + seed)
        self.name, self.num_blocks, self.hidden_size, self.planted = "planted", blocks, d, planted
        self.concept, self.anchor = concept, anchor
        self.vocab: dict[str, int] = {"[cls]": 0, anchor: 1}
        self.V = 400
        tables = [torch.randn(self.V, d, generator=g) * (1 + i) for i in range(blocks)]
        u = [torch.randn(d, generator=g) for _ in range(blocks)]
        self.u = [x / x.norm() * 3 * (1 + i) for i, x in enumerate(u)]
        self.root = _Root(tables)
        self.device = torch.device("cpu")

    def _id(self, word: str) -> int:
        if word == self.concept:
            return -1
        if word not in self.vocab:
            self.vocab[word] = 2 + zlib.crc32(word.encode()) % (self.V - 2)
        return self.vocab[word]

    def tokenize(self, text: str) -> list[int]:
        return [0] + [self._id(w) for w in re.findall(r"[a-z0-9']+", text.lower())]

    def _noise(self, text: str, n: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        return [0.3 * (1 + i) * torch.randn(n, self.hidden_size, generator=g) for i in range(self.num_blocks)]

    @torch.no_grad()
    def encode(self, prompts, blocks=()):
        out = []
        for text in prompts:
            ids = torch.tensor(self.tokenize(text))
            is_concept, is_anchor = ids == -1, ids == 1
            table_ids = torch.where(is_concept, torch.ones_like(ids), ids)
            noise = self._noise(text, len(ids))
            for i in range(self.num_blocks):
                add = (is_concept | is_anchor) if i != self.planted else is_concept
                noise[i] = noise[i] + add[:, None].float() * self.u[i]
            names = [self.layout.block_path(b) for b in blocks]
            if names:
                with ActivationCapture(self.root, names) as cap:
                    final = self.root(table_ids, noise)
                hidden = {b: cap.outputs[n][0].float() for b, n in zip(blocks, names)}
            else:
                final, hidden = self.root(table_ids, noise), {}
            out.append(EncodedPrompt(ids.tolist(), hidden, final.float()))
        return out


def tiny_bert_dir(path: Path, *, seed: int = 0) -> Path:
    """A tiny random BERT (2 blocks, width 32) with a word-level vocabulary, saved for ``from_pretrained``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from erasure_core.clear.background import BACKGROUND_PROMPTS
    from erasure_core.prompts import preset_data

    text = json.dumps(preset_data()) + " " + " ".join(BACKGROUND_PROMPTS) + " dog dogs puppy"
    words = sorted(set(re.findall(r"[a-z0-9]+", text.lower())))
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizer(str(path / "vocab.txt"))
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
