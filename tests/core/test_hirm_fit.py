"""HiRM core: only block 0 trains, the loss falls, c is calibrated and recorded, compression, errors, CLI."""

from __future__ import annotations

import pytest
import torch
from tiny_encoders import tiny_encoder

from erasure_core.errors import ConceptRequestError, FitError
from erasure_core.hirm import HirmConfig, fit_hirm, to_patch
from erasure_core.hirm.fit import C_CLIP_L, CLIP_L_H_NORM
from erasure_core.prompts import ConceptRequest

REQ = ConceptRequest.create("dog", anchor="animal")


@pytest.mark.parametrize("kind", ["clip", "t5", "bert"])
def test_hirm_s_trains_block_zero_only_and_loss_falls(kind):
    enc = tiny_encoder(kind)
    before = {n: p.detach().clone() for n, p in enc.root.named_parameters()}
    fit = fit_hirm(enc, REQ, config=HirmConfig(variant="S", epochs=60, lr=1e-2))
    assert fit.loss_drop >= 0.9
    block0 = enc.layout.block_path(0) + "."
    assert fit.deltas and all(d.key.startswith(block0) and d.key.endswith(".weight") for d in fit.deltas)
    assert all(torch.isfinite(d.delta()).all() for d in fit.deltas)
    assert all(torch.equal(before[n], p) for n, p in enc.root.named_parameters())  # adapter untouched
    assert all(p.grad is None for p in enc.root.parameters())


def test_hirm_r_calibrates_and_records_c():
    enc = tiny_encoder("clip")
    fit = fit_hirm(enc, REQ, config=HirmConfig(variant="R", epochs=2, lr=1e-3))
    assert fit.c == pytest.approx(C_CLIP_L * fit.h_norm / CLIP_L_H_NORM)
    patch = to_patch(fit, REQ, config=HirmConfig(variant="R"), model_family="hf", base_weights={})
    assert patch.fit_config["c"] == pytest.approx(fit.c) and patch.metrics["h_norm"] == pytest.approx(fit.h_norm)
    fixed = fit_hirm(enc, REQ, config=HirmConfig(variant="R", epochs=40, lr=1e-2, c=1.0))
    assert fixed.c == 1.0 and fixed.loss_drop > 0.5


def test_presets_and_compression_error_recorded():
    enc = tiny_encoder("bert")
    fit = fit_hirm(enc, REQ, config=HirmConfig(variant="S", lr=1e-2, compress_rank=2))
    assert fit.epochs == 15 and len(fit.losses) == 16
    assert fit.compression_error and all(0 <= e < 1 for e in fit.compression_error.values())
    assert any(d.is_low_rank and d.rank == 2 for d in fit.deltas)
    nude = ConceptRequest.create([], preset="nudity")
    nfit = fit_hirm(enc, nude, config=HirmConfig(variant="S", epochs=3))
    assert nfit.lr == 1e-4 and nfit.prompts == list(nude.targets) and len(nfit.prompts) > 1


def test_bad_inputs_give_clear_errors():
    enc = tiny_encoder("bert")
    with pytest.raises(ConceptRequestError, match="tokenizes to nothing"):
        fit_hirm(enc, ConceptRequest.create("\u0301"), config=HirmConfig(epochs=1))
    with pytest.raises(ConceptRequestError, match="superordinate"):
        fit_hirm(enc, REQ, config=HirmConfig(superordinate="Dog", epochs=1))
    with pytest.raises(FitError, match="variant"):
        HirmConfig(variant="X")
    w = enc.root.get_submodule(enc.layout.block_path(0) + ".attention.self.value").weight
    with torch.no_grad():
        w[0, 0] = float("nan")
    with pytest.raises(FitError, match="NaN"):
        fit_hirm(enc, REQ, config=HirmConfig(epochs=1))


def test_cli_writes_a_patch(tmp_path):
    from clear_helpers import tiny_bert_dir

    from erasure_core.cli import main
    from erasure_core.patch_file import ErasurePatch

    enc_dir = tiny_bert_dir(tmp_path / "bert")
    out = tmp_path / "hirm.safetensors"
    args = ["fit", "--method", "hirm", "--encoder", str(enc_dir), "--target", "dog", "--anchor", "animal"]
    assert main([*args, "--epochs", "5", "--lr", "1e-3", "--out", str(out), "--quiet"]) == 0
    patch = ErasurePatch.load(out)
    assert patch.method == "hirm" and all(".layer.0." in d.key for d in patch.deltas)
    assert "retain_drift" in patch.metrics and patch.fit_config["epochs"] == 5
