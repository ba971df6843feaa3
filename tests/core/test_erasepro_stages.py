"""ErasePro core: zero residual after the last stage, retain, progressive vs deep-only, bad input, CLI."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_encoders import tiny_encoder

from erasure_core.apply import applied_deltas
from erasure_core.erasepro import EraseProConfig, KVInputs, KVWeight, fit_headless, solve_kv_stage, stage_alphas
from erasure_core.erasepro.textstages import capture_inputs, fit_text_stages
from erasure_core.errors import ConceptRequestError, FitError
from erasure_core.prompts import ConceptRequest
from erasure_core.solver import compress_columns, zero_residual_delta

REQ = ConceptRequest.create("dog", anchor="cat", retain=["a car", "a tree", "a house"])
CFG = EraseProConfig(max_templates=2)


def _kv(d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.to_{w}.weight": torch.randn(24, d, generator=g) / d**0.5 for i in range(2) for w in "kv"}


def _rows(outputs, rows):
    return torch.cat([x[r] for x, r in zip(outputs, rows)]).T


@pytest.fixture(scope="module", params=["clip", "t5", "bert"])
def fitted(request):
    enc = tiny_encoder(request.param, d=96 if request.param == "t5" else 64)
    kv = _kv(enc.hidden_size)
    return enc, kv, fit_headless(enc, REQ, config=CFG, kv_weights=kv)


def test_zero_residual_after_last_stage_float32(fitted):
    enc, kv, fit = fitted
    tok = fit.text.tokens
    with applied_deltas(enc.root, fit.text.deltas):
        X_t = _rows([e.output for e in enc.encode(tok.target_prompts)], tok.target_rows)
    X_a = _rows([e.output for e in enc.encode(tok.anchor_prompts)], tok.anchor_rows)
    Vk, _ = compress_columns(X_t.double(), CFG.tol)
    Vk = Vk.float()
    deltas = {d.key: d.delta(torch.float32) for d in fit.kv.deltas}
    assert set(deltas) == set(kv)
    for key, W in kv.items():
        want = W @ X_a @ Vk
        got = (W + deltas[key]) @ X_t @ Vk
        assert float(torch.linalg.norm(got - want) / torch.linalg.norm(want)) < 1e-4
    assert fit.metrics()["residual"] < 1e-10


def test_last_text_stage_is_exact_without_kv():
    enc = tiny_encoder("clip", d=64)
    res = fit_text_stages(enc, REQ, config=CFG)
    assert [round(s.alpha, 4) for s in res.stages] == [round(a, 4) for a in stage_alphas(enc.num_blocks)]
    name = enc.layout.v_proj_path(enc.num_blocks - 1)
    tok = res.tokens
    with applied_deltas(enc.root, res.deltas[:-1]):
        X_t = _rows(capture_inputs(enc, tok.target_prompts, [name])[name], tok.target_rows)
    X_a = _rows(capture_inputs(enc, tok.anchor_prompts, [name])[name], tok.anchor_rows)
    W = enc.root.get_submodule(name).weight.detach()
    Vk = compress_columns(X_t.double(), CFG.tol)[0].float()
    got = (W + res.deltas[-1].delta()) @ X_t @ Vk
    want = W @ X_a @ Vk
    assert float(torch.linalg.norm(got - want) / torch.linalg.norm(want)) < 1e-4


def test_retain_outputs_change_below_one_percent(fitted):
    enc, kv, fit = fitted
    retain = list(fit.text.sets.retain)
    before = torch.cat([e.output for e in enc.encode(retain)]).T
    with applied_deltas(enc.root, fit.text.deltas):
        after = torch.cat([e.output for e in enc.encode(retain)]).T
    deltas = {d.key: d.delta() for d in fit.kv.deltas}
    for key, W in kv.items():
        change = torch.linalg.norm((W + deltas[key]) @ after - W @ before) / torch.linalg.norm(W @ before)
        assert float(change) < 0.01, key


def test_progressive_schedule_gives_smaller_deep_deltas():
    enc = tiny_encoder("bert", d=64)
    kv = _kv(64)
    prog = fit_headless(enc, REQ, config=CFG, kv_weights=kv)
    deep = fit_headless(enc, REQ, config=dataclasses.replace(CFG, blocks=()), kv_weights=kv)
    norm = lambda f: sum(float(torch.linalg.norm(d.delta())) for d in f.kv.deltas)  # noqa: E731
    assert norm(prog) < norm(deep)
    assert deep.text.deltas == [] and len(prog.text.deltas) == enc.num_blocks


def test_shared_factorisation_matches_single_solves():
    g = torch.Generator().manual_seed(3)
    X_t, X_a, X_r = (torch.randn(16, n, generator=g) for n in (5, 5, 40))
    Ws = [torch.randn(8, 16, generator=g) for _ in range(3)]
    res = solve_kv_stage([KVWeight(f"w{i}", W, "g") for i, W in enumerate(Ws)], {"g": KVInputs(X_t, X_a, X_r)})
    lam = 1e-3 * float((X_r.double() ** 2).sum()) / 16
    for d, W in zip(res.deltas, Ws):
        ref, _ = zero_residual_delta(W, X_t, W @ X_a, X_r=X_r, lam=lam)
        torch.testing.assert_close(d.delta(torch.float64), ref.dense(), rtol=1e-4, atol=1e-6)


def test_bad_inputs_give_clear_errors():
    enc = tiny_encoder("bert", d=32)
    with pytest.raises(ConceptRequestError, match="anchor"):
        ConceptRequest.create("dog", anchor="Dog")
    same = ConceptRequest(("dog",), "dog", ("a car",), "object")
    with pytest.raises(ConceptRequestError, match="tokenizes exactly like the target"):
        fit_headless(enc, same, config=CFG)
    with pytest.raises(ConceptRequestError, match="tokenizes to nothing"):
        fit_headless(enc, ConceptRequest.create("\u0301\u0301", anchor="cat"), config=CFG)
    with pytest.raises(FitError, match="schedule"):
        EraseProConfig(schedule="cubic")
    for name in (enc.layout.v_proj_path(1), enc.layout.block_path(0) + ".attention.self.query"):
        w = enc.root.get_submodule(name).weight
        saved = w.detach().clone()
        with torch.no_grad():
            w[0, 0] = float("nan")
        try:
            with pytest.raises(FitError, match="NaN"):
                fit_headless(enc, REQ, config=CFG, kv_weights=_kv(32))
        finally:
            with torch.no_grad():
                w.copy_(saved)


def test_cli_writes_a_loadable_patch(tmp_path):
    from clear_helpers import tiny_bert_dir
    from safetensors.torch import save_file

    from erasure_core.cli import main
    from erasure_core.patch_file import ErasurePatch

    enc_dir = tiny_bert_dir(tmp_path / "bert")
    kv_file = tmp_path / "kv.safetensors"
    save_file(_kv(32), str(kv_file))
    out = tmp_path / "ep.safetensors"
    args = ["fit", "--method", "erasepro", "--encoder", str(enc_dir), "--target", "dog", "--anchor", "cat"]
    rc = main([*args, "--max-templates", "2", "--kv-weights", str(kv_file), "--out", str(out), "--quiet"])
    assert rc == 0
    patch = ErasurePatch.load(out)
    assert patch.method == "erasepro" and len(patch.clip_deltas()) == 2 and len(patch.model_deltas()) == 4
    assert patch.metrics["residual"] < 1e-8 and "retain_cos" in patch.metrics
