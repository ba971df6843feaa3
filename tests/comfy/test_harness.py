"""The tiny ComfyUI models themselves, the CLIP adapter, and weight patches on clones."""

from __future__ import annotations

import comfy_env
import pytest
import torch

comfy_env.load_pack()

from comfyui_concept_erasure.patches.apply import apply_weight_patch, effective_weight  # noqa: E402
from comfyui_concept_erasure.patches.clip_encoder import ComfyTextEncoder, available_encoders  # noqa: E402
from comfyui_concept_erasure.patches.families import detect_family, model_state_shapes  # noqa: E402

from erasure_core.errors import PatchMismatchError  # noqa: E402
from erasure_core.patch_file import ErasurePatch, make_delta  # noqa: E402


def test_two_sampling_steps_are_finite(tiny):
    with torch.inference_mode():
        out = tiny.sample(steps=2)
    assert out.shape == tiny.latent_shape
    assert torch.isfinite(out).all()


def test_family_detected_and_kv_targets(tiny):
    spec = detect_family(tiny.model)
    assert spec.name == tiny.family
    targets = spec.kv_targets(model_state_shapes(tiny.model))
    assert targets and {t.which for t in targets} == {"k", "v"}
    if tiny.family == "flux":
        assert all(t.offset is not None and "txt_attn.qkv" in t.key for t in targets)
        assert not any("single_blocks" in t.key for t in targets)


def test_clip_adapter_real_tokens_only(tiny):
    for name in available_encoders(tiny.clip):
        enc = ComfyTextEncoder(tiny.clip, name)
        ids = enc.tokenize("a photo of a dog")
        (res,) = enc.encode(["a photo of a dog"], blocks=[0, enc.num_blocks - 1])
        assert res.ids == ids
        for h in res.hidden.values():
            assert h.shape == (len(ids), enc.hidden_size)
            assert h.dtype == torch.float32


def _random_patch(tiny, rank=2, seed=0):
    spec = detect_family(tiny.model)
    shapes = model_state_shapes(tiny.model)
    t = spec.kv_targets(shapes)[0]
    d_out = t.offset[2] if t.offset else shapes[t.key][0]
    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn(d_out, rank, generator=g), torch.randn(rank, shapes[t.key][1], generator=g)
    delta = make_delta(t.key, "model", up, down, offset=t.offset, lora_name=t.lora_name)
    return ErasurePatch("pure", tiny.family, deltas=(delta,)), t


def test_apply_on_clone_is_pure_idempotent_and_scaled(tiny):
    patch, t = _random_patch(tiny)
    before = {k: v.detach().clone() for k, v in tiny.model.model.state_dict().items()}
    w0 = effective_weight(tiny.model, t.key)
    m1, _ = apply_weight_patch(tiny.model, None, patch, 1.0)
    m2, _ = apply_weight_patch(m1, None, patch, 1.0)  # same patch again: replaced, not doubled
    m0, _ = apply_weight_patch(tiny.model, None, patch, 0.0)
    w1, w2 = effective_weight(m1, t.key), effective_weight(m2, t.key)
    assert torch.equal(w1, w2)
    assert torch.equal(effective_weight(m0, t.key), w0)
    expected = w0.clone()
    rows = slice(t.offset[1], t.offset[1] + t.offset[2]) if t.offset else slice(None)
    expected[rows] += patch.deltas[0].delta()
    torch.testing.assert_close(w1, expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        tiny.sample(model=m1)  # bakes m1's patch into the shared module...
        tiny.sample(model=tiny.model)  # ...and loading the original restores it from the backup
    after = tiny.model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wrong_family_is_refused_naming_both(build_tiny):
    sd = build_tiny("sd15")
    patch, _ = _random_patch(sd)
    wan = build_tiny("wan21")
    with pytest.raises(PatchMismatchError, match=r"fitted on Stable Diffusion 1\.5, but the MODEL is Wan"):
        apply_weight_patch(wan.model, None, patch, 1.0)
