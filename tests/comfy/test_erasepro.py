"""ErasePro in the real ComfyUI on tiny models of every family: zero residual, retain, export, purity."""

from __future__ import annotations

import comfy_env
import torch

comfy_env.load_pack()

import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
from comfyui_concept_erasure.patches.apply import apply_weight_patch, effective_weight  # noqa: E402
from comfyui_concept_erasure.patches.clip_encoder import ComfyTextEncoder  # noqa: E402
from comfyui_concept_erasure.patches.erasepro import OPTIONS, _cond, fit_erasepro  # noqa: E402
from comfyui_concept_erasure.patches.families import detect_family, model_state_shapes  # noqa: E402
from comfyui_concept_erasure.patches.kv_inputs import kv_group, kv_inputs  # noqa: E402

from erasure_core.prompts import ConceptRequest  # noqa: E402
from erasure_core.solver import compress_columns  # noqa: E402

REQ = ConceptRequest.create("dog", anchor="cat", retain=["a car", "a tree"])
OPTS = {"max_templates": 2, "latent_size": 64, "steps": 2}


def _weight(patcher, t):
    W = effective_weight(patcher, t.key)
    return W if t.offset is None else W.narrow(t.offset[0], t.offset[1], t.offset[2])


def test_erasepro_zero_residual_and_retain(tiny):
    with torch.inference_mode():
        cond0 = tiny.encode("a photo of a dog")[0][0].clone()
        res = fit_erasepro(tiny.model, tiny.clip, REQ, seed=0, **OPTS)
        assert torch.equal(tiny.encode("a photo of a dog")[0][0], cond0)  # the input CLIP is untouched
        patch = res.patch
        assert patch.model_family == tiny.family and patch.clip_deltas() and patch.model_deltas()
        model2, clip2 = apply_weight_patch(tiny.model, tiny.clip, patch, 1.0)
        fit = res.extra["fit"]
        tokens = fit.text.tokens
        fam = tiny.family
        spec = detect_family(tiny.model)
        kw = {"steps": 2, "seed": 0, "latent_size": 64}
        t_in = kv_inputs(tiny.model, [_cond(clip2, p, fam) for p in tokens.target_prompts], **kw)
        a_in = kv_inputs(tiny.model, [_cond(tiny.clip, p, fam) for p in tokens.anchor_prompts], **kw)
        retain = list(fit.text.sets.retain)
        ref = ComfyTextEncoder(tiny.clip, patch.fit_config["encoders"][-1])
        r_len = [len(ref.tokenize(p)) for p in retain]
        r_new = kv_inputs(tiny.model, [_cond(clip2, p, fam) for p in retain], **kw)
        r_old = kv_inputs(tiny.model, [_cond(tiny.clip, p, fam) for p in retain], **kw)
        targets = spec.kv_targets(model_state_shapes(tiny.model), tiny.model)
        assert len(patch.model_deltas()) == len(targets)
        for t in targets:
            g = kv_group(spec, t.layer)
            X_t = torch.cat([x[r] for d, r in zip(t_in, tokens.target_rows) for x in d[g]]).T
            X_a = torch.cat([x[r] for d, r in zip(a_in, tokens.anchor_rows) for x in d[g]]).T
            W, W2 = _weight(tiny.model, t), _weight(model2.patcher if hasattr(model2, "patcher") else model2, t)
            Vk = compress_columns(X_t.double(), 1e-3)[0].float()
            want = W @ X_a @ Vk
            rel = torch.linalg.norm(W2 @ X_t @ Vk - want) / torch.linalg.norm(want)
            assert float(rel) < 1e-4, (t.key, float(rel))
            Xr_new = torch.cat([x[:n] for d, n in zip(r_new, r_len) for x in d[g]]).T
            Xr_old = torch.cat([x[:n] for d, n in zip(r_old, r_len) for x in d[g]]).T
            change = torch.linalg.norm(W2 @ Xr_new - W @ Xr_old) / torch.linalg.norm(W @ Xr_old)
            assert float(change) < 0.01, (t.key, float(change))
    assert patch.metrics["residual"] < 1e-8 and patch.metrics["retain_drift"] < 0.01
    assert res.image is not None and res.image.ndim == 3


def test_erasepro_export_loads_in_stock_lora_loader(build_tiny, tmp_path):
    for family in ("sdxl", "flux"):
        tiny = build_tiny(family)
        with torch.inference_mode():
            res = fit_erasepro(tiny.model, tiny.clip, REQ, **OPTS)
            path = res.patch.save(tmp_path / f"ep_{family}.safetensors")
            lora = comfy.utils.load_torch_file(str(path))
            stock_m, stock_c = comfy.sd.load_lora_for_models(tiny.model, tiny.clip, lora, 1.0, 1.0)
            ours_m, ours_c = apply_weight_patch(tiny.model, tiny.clip, res.patch, 1.0)
            for d in res.patch.clip_deltas():
                torch.testing.assert_close(
                    effective_weight(stock_c.patcher, d.key), effective_weight(ours_c.patcher, d.key)
                )
            for d in res.patch.model_deltas():
                a, b = effective_weight(stock_m, d.key), effective_weight(ours_m, d.key)
                torch.testing.assert_close(a, b)
                assert not torch.equal(a, effective_weight(tiny.model, d.key))


def test_options_follow_the_contract():
    assert all(o["type"] in ("int", "float", "bool", "combo") for o in OPTIONS.values())
