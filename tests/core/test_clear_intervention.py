"""CLEAR's intervention: exact formula, untouched tokens bit-identical, gamma 0, stacking, hooks, files, CLI."""

from __future__ import annotations

import pytest
import torch
from clear_helpers import PlantedEncoder, tiny_bert_dir

from erasure_core.clear import ClearConfig, ClearIntervention, apply_interventions, fit_clear, intervened
from erasure_core.clear.sae import topk_relu
from erasure_core.cli import main
from erasure_core.patch_file import ClearModule, ErasurePatch
from erasure_core.prompts import ConceptRequest


def _module(d=8, m=32, topk=4, seed=0, n_spec=5, scale=2.5, block=1) -> ClearModule:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d, m, generator=g)
    W_dec /= W_dec.norm(dim=0)
    mask = torch.zeros(m, dtype=torch.bool)
    mask[torch.randperm(m, generator=g)[:n_spec]] = True
    return ClearModule(
        encoder="planted",
        block=block,
        block_path=f"encoder.layer.{block}",
        W_enc=torch.randn(m, d, generator=g),
        b_enc=torch.randn(m, generator=g) - (1.0 if topk == 0 else 0.0),
        W_dec=W_dec,
        b_dec=0.1 * torch.randn(d, generator=g),
        mask=mask,
        scale=scale,
        topk=topk,
        concept="x",
    )


def _reference(m: ClearModule, h: torch.Tensor, gamma: float) -> torch.Tensor:
    pre = (h.double() / m.scale - m.b_dec.double()) @ m.W_enc.double().t() + m.b_enc.double()
    f = topk_relu(pre, m.topk) * m.mask.double()
    return h.double() - gamma * m.scale * f @ m.W_dec.double().t()


@pytest.mark.parametrize("topk", [4, 0])
def test_formula_and_untouched_rows_bit_identical(topk):
    m = _module(topk=topk)
    h = 3 * torch.randn(6, 10, 8, generator=torch.Generator().manual_seed(1))
    out = ClearIntervention(m)(h, 1.5)
    ref = _reference(m, h.reshape(-1, 8), 1.5).reshape(h.shape)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    pre = (h / m.scale - m.b_dec) @ m.W_enc.t() + m.b_enc
    fires = ((topk_relu(pre, m.topk) * m.mask) > 0).any(-1)
    assert fires.any() and (~fires).any()
    assert torch.equal(out[~fires], h[~fires])
    assert (out[fires] != h[fires]).any(-1).all()


def test_half_precision_input_keeps_dtype_and_untouched_rows():
    m = _module()
    h = (3 * torch.randn(40, 8, generator=torch.Generator().manual_seed(2))).half()
    out = ClearIntervention(m)(h, 1.0)
    assert out.dtype == torch.float16
    ref = _reference(m, h.float(), 1.0)
    changed = (out != h).any(-1)
    assert changed.any()
    torch.testing.assert_close(out.double(), ref.half().double(), rtol=2e-3, atol=2e-3)


def test_gamma_zero_and_no_specific_features_return_the_input_itself():
    m = _module()
    h = torch.randn(5, 8)
    assert ClearIntervention(m)(h, 0.0) is h
    none = ClearModule(**{**m.__dict__, "mask": torch.zeros_like(m.mask)})
    assert ClearIntervention(none)(h, 1.0) is h


def test_stacked_modules_add_and_do_not_depend_on_order():
    a, b = ClearIntervention(_module(seed=0)), ClearIntervention(_module(seed=1))
    h = 3 * torch.randn(30, 8, generator=torch.Generator().manual_seed(3))
    ab = apply_interventions(h, [(a, 1.0), (b, 0.5)])
    ba = apply_interventions(h, [(b, 0.5), (a, 1.0)])
    torch.testing.assert_close(ab, ba)
    expected = _reference(a.module, h, 1.0) + _reference(b.module, h, 0.5) - h.double()
    torch.testing.assert_close(ab.double(), expected, rtol=1e-5, atol=1e-5)


def test_tensors_are_cached_per_device_and_dtype():
    iv = ClearIntervention(_module())
    iv(torch.randn(3, 8), 1.0)
    iv(torch.randn(3, 8), 1.0)
    iv(torch.randn(3, 8).half(), 1.0)  # CPU half computes in float32: same cache entry
    assert list(iv._cache) == [(torch.device("cpu"), torch.float32)]


def test_intervened_hooks_a_plain_encoder_and_removes_the_hooks():
    enc = PlantedEncoder(0)
    m = _module(d=16, m=64, block=2)
    (before,) = enc.encode(["a photo of zebra"], blocks=[2])
    with intervened(enc, [m], gamma=1.0):
        (inside,) = enc.encode(["a photo of zebra"], blocks=[2])
    (after,) = enc.encode(["a photo of zebra"], blocks=[2])
    torch.testing.assert_close(inside.hidden[2], ClearIntervention(m)(before.hidden[2], 1.0))
    assert torch.equal(after.hidden[2], before.hidden[2])
    assert not enc.root.encoder.layer[2]._forward_hooks


def test_patch_round_trip_keeps_modules_and_intervention(tmp_path):
    request = ConceptRequest.create("zebra", anchor="horse", preset="object")
    fit = fit_clear(PlantedEncoder(0), request, config=ClearConfig(search_steps=60, finetune_steps=20, background=0))
    patch = ErasurePatch("clear", "hf", clear_modules=fit.modules, concept=request.to_dict())
    loaded = ErasurePatch.load(patch.save(tmp_path / "zebra.safetensors"))
    (a,), (b,) = patch.clear_modules, loaded.clear_modules
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.block, a.block_path, a.scale, a.topk, a.concept) == (b.block, b.block_path, b.scale, b.topk, b.concept)
    h = PlantedEncoder(0).encode(["a photo of zebra"], blocks=[a.block])[0].hidden[a.block]
    assert torch.equal(ClearIntervention(a)(h), ClearIntervention(b)(h))


def test_cli_fit_and_eval_on_a_tiny_bert(tmp_path, capsys):
    enc_dir = tiny_bert_dir(tmp_path / "bert")
    out, png = tmp_path / "dog.safetensors", tmp_path / "dog.png"
    args = [
        "fit",
        "--method",
        "clear",
        "--encoder",
        str(enc_dir),
        "--target",
        "a dog",
        "--out",
        str(out),
        "--search-steps",
        "30",
        "--finetune-steps",
        "10",
        "--background",
        "8",
        "--quiet",
        "--report",
        str(png),
    ]
    assert main(args) == 0
    assert "forget_leakage" in capsys.readouterr().out
    patch = ErasurePatch.load(out)
    assert patch.method == "clear" and patch.model_family == "hf" and len(patch.clear_modules) == 1
    m = patch.clear_modules[0]
    assert m.block_path == f"encoder.layer.{m.block}" and m.W_enc.shape == (256, 32)
    assert patch.fit_config["search_steps"] == 30 and patch.metrics["clear"][0]["block"] == m.block
    assert list(patch.fingerprint) == [f"encoder.layer.{m.block}.attention.self.value.weight"]
    assert png.stat().st_size > 1000
    assert main(["eval", str(out), "--encoder", str(enc_dir)]) == 0
    assert "retain_cos" in capsys.readouterr().out
