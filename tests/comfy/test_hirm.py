"""HiRM in the real ComfyUI on tiny CLIPs of every kind, under inference mode with fp16 text encoders."""

from __future__ import annotations

import comfy_env
import pytest
import torch

comfy_env.load_pack()

import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
from comfyui_concept_erasure.patches.apply import apply_weight_patch, effective_weight  # noqa: E402
from comfyui_concept_erasure.patches.hirm import OPTIONS, fit_hirm  # noqa: E402

from erasure_core.prompts import ConceptRequest  # noqa: E402

REQ = ConceptRequest.create("dog", anchor="animal")
FAST = {"epochs": 60, "lr": 1e-2}


def _state(clip):
    return {k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()}


@pytest.mark.parametrize(
    "family,encoders",
    [("sd15", ["clip_l"]), ("sdxl", ["clip_l", "clip_g"]), ("flux", ["clip_l", "t5xxl"]), ("wan21", ["umt5xxl"])],
)
def test_hirm_fits_block_zero_in_inference_mode(build_tiny, family, encoders):
    tiny = build_tiny(family)
    with torch.inference_mode():
        cond0 = tiny.encode("a photo of a dog")[0][0].clone()
        state0 = _state(tiny.clip)
        res = fit_hirm(tiny.model, tiny.clip, REQ, seed=0, **FAST)
        cond1 = tiny.encode("a photo of a dog")[0][0]
        state1 = _state(tiny.clip)
    assert torch.equal(cond0, cond1) and all(torch.equal(state0[k], state1[k]) for k in state0)  # CLIP untouched
    patch = res.patch
    assert sorted(patch.fit_config["encoders"]) == sorted(encoders)
    assert all(".layers.0." in d.key or ".block.0." in d.key for d in patch.deltas)
    assert {d.key.split(".")[0] for d in patch.deltas} == set(encoders)
    for name, m in patch.metrics["per_encoder"].items():
        assert 1 - m["loss_last"] / m["loss_first"] >= 0.9, name
    assert 0 <= patch.metrics["retain_drift"] < 2 and set(patch.metrics["retain_drift_per_encoder"]) == set(encoders)
    assert res.image is not None and res.image.ndim == 3 and "HiRM-S" in res.summary
    with torch.inference_mode():
        _, edited = apply_weight_patch(tiny.model, tiny.clip, patch, 1.0)
        changed = set()
        for key in patch.fingerprint:
            base = effective_weight(tiny.clip.patcher, key)
            if not torch.equal(effective_weight(edited.patcher, key), base):
                changed.add(key)
        assert changed and all(".layers.0." in k or ".block.0." in k for k in changed)
        assert not torch.equal(tiny.encode("a photo of a dog", clip=edited)[0][0], cond0)


def test_hirm_export_loads_in_stock_lora_loader(build_tiny, tmp_path):
    tiny = build_tiny("sdxl")
    with torch.inference_mode():
        res = fit_hirm(tiny.model, tiny.clip, REQ, epochs=5, lr=1e-2)
        path = res.patch.save(tmp_path / "hirm.safetensors")
        lora = comfy.utils.load_torch_file(str(path))
        assert all(k.startswith("text_encoders.") and k.endswith(".diff") for k in lora)
        _, stock = comfy.sd.load_lora_for_models(tiny.model, tiny.clip, lora, 1.0, 1.0)
        _, ours = apply_weight_patch(tiny.model, tiny.clip, res.patch, 1.0)
        for d in res.patch.deltas:
            torch.testing.assert_close(effective_weight(stock.patcher, d.key), effective_weight(ours.patcher, d.key))


def test_options_follow_the_contract():
    assert {"variant", "encoder", "epochs", "lr"} <= set(OPTIONS)
    assert all(o["type"] in ("int", "float", "bool", "combo") for o in OPTIONS.values())
