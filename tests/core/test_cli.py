"""The command line: inspect prints metadata; malformed files give one line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from erasure_core.cli import main
from erasure_core.patch_file import ErasurePatch, make_delta


def _patch(tmp_path):
    g = torch.Generator().manual_seed(0)
    d = make_delta(
        "diffusion_model.blocks.0.cross_attn.k.weight",
        "model",
        torch.randn(64, 2, generator=g),
        torch.randn(2, 32, generator=g),
    )
    p = ErasurePatch(
        "pure",
        "wan21",
        deltas=(d,),
        concept={"targets": ["a dog"], "anchor": ""},
        metrics={"forget_energy_removed": 0.995},
    )
    return p.save(tmp_path / "dog.safetensors")


def test_inspect_json(tmp_path, capsys):
    path = _patch(tmp_path)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "pure" and info["model_family"] == "wan21"
    assert info["concept"]["targets"] == ["a dog"]
    assert info["deltas"][0]["kind"] == "lowrank" and info["deltas"][0]["shape"] == [64, 32]
    assert info["file_size"] == path.stat().st_size


def test_inspect_text(tmp_path, capsys):
    path = _patch(tmp_path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pure patch for wan21" in out and "cross_attn.k.weight" in out


def test_malformed_file_one_line_error_no_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    r = subprocess.run(
        [sys.executable, "-m", "erasure_core", "inspect", str(bad), "--json"], capture_output=True, text=True
    )
    assert r.returncode != 0
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_missing_file_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "no patch file" in capsys.readouterr().err
