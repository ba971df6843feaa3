"""``python -m erasure_core fit --method pure``: synthetic SD1.5 stack, a --kv-weights file, bad input."""

from __future__ import annotations

import pytest
import torch
from clear_helpers import tiny_bert_dir
from safetensors.torch import save_file

from erasure_core.cli import main
from erasure_core.patch_file import ErasurePatch

FAST = ["--queries", "8", "--read-seeds", "1", "--threshold", "2", "--quiet"]


@pytest.fixture(scope="module")
def enc_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("bert") / "bert")


def _fit(enc_dir, out, *extra):
    args = ["fit", "--method", "pure", "--encoder", str(enc_dir), "--target", "dog", "--retain", "cat"]
    return main([*args, "--retain", "car", *FAST, *extra, "--out", str(out)])


def test_synthetic_stack_patch(enc_dir, tmp_path, capsys):
    out = tmp_path / "pure.safetensors"
    assert _fit(enc_dir, out, "--rank", "4") == 0
    assert "wrote" in capsys.readouterr().out
    patch = ErasurePatch.load(out)
    assert patch.method == "pure" and patch.model_family == "hf"
    keys = {d.key for d in patch.model_deltas()}
    assert keys and all(k.startswith("layers.") and k.endswith((".to_k.weight", ".to_v.weight")) for k in keys)
    assert all(d.is_low_rank and d.rank <= 4 for d in patch.deltas)
    m = patch.metrics
    assert 1 <= m["rank_min"] <= m["rank_max"] <= 4 and m["layers"] == 16
    assert m["retain_kv_change_max"] < 0.5 and 0 < m["forget_energy_removed_mean"] <= 1
    assert "forget_leakage" in m and patch.fit_config["rank"] == 4
    assert set(patch.fingerprint) == keys


def test_kv_weights_file(enc_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    kv = {
        "diffusion_model.a.attn2.to_k.weight": torch.randn(64, 32, generator=g),
        "diffusion_model.a.attn2.to_v.weight": torch.randn(64, 32, generator=g),
        "diffusion_model.b.cross_attn.k.weight": torch.randn(128, 32, generator=g),
        "diffusion_model.b.cross_attn.v.weight": torch.randn(128, 32, generator=g),
    }
    path = tmp_path / "kv.safetensors"
    save_file(kv, str(path))
    out = tmp_path / "pure.safetensors"
    assert _fit(enc_dir, out, "--kv-weights", str(path), "--anchor", "cat") == 0
    patch = ErasurePatch.load(out)
    deltas = {d.key: d for d in patch.model_deltas()}
    assert set(deltas) <= set(kv) and deltas
    for key, d in deltas.items():
        assert d.shape == tuple(kv[key].shape)
        # the edit is a projection (plus the anchor map) on the input side: W' = W + up down, down = Q^T
        Q = d.down.float().T
        torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1]), atol=1e-4, rtol=0)
    assert patch.metrics["layers"] == 2 and patch.fit_config["stack"].startswith("4 K/V weights")


def test_bad_kv_weights_exit_2(enc_dir, tmp_path, capsys):
    path = tmp_path / "kv.safetensors"
    save_file({"x.attn2.to_k.weight": torch.zeros(8, 16)}, str(path))
    out = tmp_path / "pure.safetensors"
    assert _fit(enc_dir, out, "--kv-weights", str(path)) == 2
    err = capsys.readouterr().err.split("\r")[-1].strip().splitlines()[-1]  # after transformers' loading bar
    assert err.startswith("error: --kv-weights") and "32-wide" in err and "(8, 16)" in err
    assert not out.exists()
    assert _fit(enc_dir, out, "--rank", "0") == 2
    assert "--rank" in capsys.readouterr().err
