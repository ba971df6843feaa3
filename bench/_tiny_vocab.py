"""A word-level tokenizer over the preset vocabulary for the benchmarks (no download)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path


def tokenizer():
    from transformers import BertTokenizer

    from erasure_core.prompts import preset_data

    text = json.dumps(preset_data()) + " dog dogs animal painting person cat car tree house"
    words = sorted(set(re.findall(r"[a-z0-9]+", text.lower())))
    path = Path(tempfile.mkdtemp(prefix="bench_vocab_")) / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizer(str(path))
