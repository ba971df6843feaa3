"""CLEAR in the real ComfyUI on tiny CLIPs of every encoder kind: apply on clones, identity, stacking, fit."""

from __future__ import annotations

import dataclasses

import comfy_env
import pytest
import torch

comfy_env.load_pack()

from comfyui_concept_erasure.nodes.clear_intervene import ClearIntervene  # noqa: E402
from comfyui_concept_erasure.patches.clear import OPTIONS, apply_clear, fit_clear  # noqa: E402
from comfyui_concept_erasure.patches.clip_encoder import ComfyTextEncoder  # noqa: E402

from erasure_core.capture import first_tensor  # noqa: E402
from erasure_core.clear import ClearIntervention  # noqa: E402
from erasure_core.errors import PatchMismatchError  # noqa: E402
from erasure_core.patch_file import ClearModule, ErasurePatch  # noqa: E402
from erasure_core.prompts import ConceptRequest  # noqa: E402

CASES = [
    ("sd15", "clip_l"),
    ("sdxl", "clip_l"),
    ("sdxl", "clip_g"),
    ("flux", "t5xxl"),
    ("flux", "clip_l"),
    ("wan21", "umt5xxl"),
]
TARGET = "a photo of a dog"
UNRELATED = ["a red car on a street", "a photo of a cat", "mountains at sunset", ""]


def _encode(clip, text):
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    pooled = out.get("pooled_output")
    return out["cond"].clone(), (pooled if pooled is not None else torch.zeros(1)).clone()


def _block_output(clip, enc, block, text):
    """The full output of ``block`` (padding included) while encoding ``text`` with ``clip``."""
    seen = []
    module = enc.root.get_submodule(enc.layout.block_path(block))
    handle = module.register_forward_hook(lambda m, i, o: seen.append(first_tensor(o).detach().float().clone()))
    try:
        clip.load_model()
        _encode(clip, text)
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def _crafted(clip, enc, block, text, concept="dog"):
    """A ReLU CLEAR module whose one specific feature fires only on tokens ~ equal to ``text``'s concept token."""
    n = len(enc.tokenize(text))
    h = _block_output(clip, enc, block, text)
    v = h[n - 2]  # the last word before the end token
    d, m = v.numel(), 4
    scale = float(h[:n].norm(dim=-1).mean()) / d**0.5
    u = v / v.norm()
    W_enc = torch.zeros(m, d)
    W_enc[0] = 500 * u  # fires where <u, h> > 0.999 |v| only, with f(v) = 0.5 |v| / scale
    b_enc = torch.full((m,), -1e4)
    b_enc[0] = -500 * 0.999 * float(v.norm()) / scale
    W_dec = torch.eye(d, m) if d >= m else torch.randn(d, m)
    W_dec[:, 0] = u
    W_dec = W_dec / W_dec.norm(dim=0)
    mask = torch.tensor([True, False, False, False])
    return ClearModule(
        enc.name,
        block,
        enc.block_path(block),
        W_enc,
        b_enc,
        W_dec,
        torch.zeros(d),
        mask,
        scale,
        topk=0,
        concept=concept,
    )


def _hits(clip, enc, module, text):
    return ClearIntervention(module).correction(_block_output(clip, enc, module.block, text)) is not None


@pytest.mark.parametrize("family,encoder", CASES)
def test_intervention_changes_only_prompts_that_fire(build_tiny, family, encoder):
    tiny = build_tiny(family)
    clip = tiny.clip
    with torch.inference_mode():
        enc = ComfyTextEncoder(clip, encoder)
        module = _crafted(clip, enc, 1, TARGET)
        patch = ErasurePatch("clear", family, clear_modules=(module,), concept={"targets": ["a dog"]})
        before = {t: _encode(clip, t) for t in [TARGET, *UNRELATED]}
        edited = apply_clear(clip, patch, 1.0)
        edited.load_model()
        after = {t: _encode(edited, t) for t in before}
        zero = apply_clear(clip, patch, 0.0)
        zero.load_model()
        at_zero = _encode(zero, TARGET)
        clip.load_model()
        again = {t: _encode(clip, t) for t in before}
        hits = {t: _hits(clip, enc, module, t) for t in before}
    assert hits[TARGET] and not any(hits[t] for t in UNRELATED)
    part = 1 if (family, encoder) == ("flux", "clip_l") else 0  # Flux reads only CLIP-L's pooled vector
    assert not torch.equal(after[TARGET][part], before[TARGET][part])
    for t in UNRELATED:
        assert torch.equal(after[t][0], before[t][0]) and torch.equal(after[t][1], before[t][1]), t
    assert all(torch.equal(x, y) for x, y in zip(at_zero, before[TARGET]))
    for t in before:  # the original CLIP is untouched
        assert all(torch.equal(x, y) for x, y in zip(again[t], before[t])), t
    assert not clip.patcher.object_patches


def test_two_patches_stack_and_reapplying_replaces(build_tiny):
    tiny = build_tiny("wan21")
    clip = tiny.clip
    other, third = "a bowl of fresh soup", "a green tree in spring"
    with torch.inference_mode():
        enc = ComfyTextEncoder(clip, "umt5xxl")
        pa = ErasurePatch("clear", "wan21", clear_modules=(_crafted(clip, enc, 1, TARGET),))
        pb = ErasurePatch("clear", "wan21", clear_modules=(_crafted(clip, enc, 1, other, "soup"),))
        pc = ErasurePatch("clear", "wan21", clear_modules=(_crafted(clip, enc, 2, third, "tree"),))
        base = {t: _encode(clip, t)[0] for t in (TARGET, other, third)}
        only_a = apply_clear(clip, pa, 1.0)
        ab = apply_clear(only_a, pb, 1.0)
        aab = apply_clear(ab, pa, 1.0)  # same patch again: replaced, not doubled
        abc = apply_clear(ab, pc, 1.0)  # another block
        outs = {}
        for name, c in {"a": only_a, "ab": ab, "aab": aab, "abc": abc}.items():
            c.load_model()
            outs[name] = {t: _encode(c, t)[0] for t in (TARGET, other, third)}
    assert torch.equal(outs["a"][other], base[other]) and not torch.equal(outs["a"][TARGET], base[TARGET])
    assert torch.equal(outs["ab"][TARGET], outs["a"][TARGET]) and not torch.equal(outs["ab"][other], base[other])
    assert all(torch.equal(outs["aab"][t], outs["ab"][t]) for t in outs["ab"])
    assert torch.equal(outs["ab"][third], base[third]) and not torch.equal(outs["abc"][third], base[third])
    assert torch.equal(outs["abc"][TARGET], outs["ab"][TARGET])
    assert len(ab.patcher.object_patches) == 1 and len(abc.patcher.object_patches) == 2
    assert not only_a.patcher.object_patches.keys() - ab.patcher.object_patches.keys()
    assert len(only_a.patcher.object_patches[next(iter(only_a.patcher.object_patches))].entries) == 1


def test_layer_override_and_mismatch_errors(build_tiny):
    tiny = build_tiny("sd15")
    with torch.inference_mode():
        enc = ComfyTextEncoder(tiny.clip, "clip_l")
        module = _crafted(tiny.clip, enc, 1, TARGET)
        moved = apply_clear(tiny.clip, [module], 1.0, layer_override=2)
        assert list(moved.patcher.object_patches) == [f"{enc.block_path(2)}.forward"]
        with pytest.raises(PatchMismatchError, match="block 7 does not exist"):
            apply_clear(tiny.clip, [module], 1.0, layer_override=7)
        wrong = dataclasses.replace(module, encoder="umt5xxl")
        with pytest.raises(PatchMismatchError, match="fitted on the 'umt5xxl' text encoder"):
            apply_clear(tiny.clip, [wrong], 1.0)
        with pytest.raises(PatchMismatchError, match="without CLEAR modules"):
            apply_clear(tiny.clip, ErasurePatch("pure", "sd15"), 1.0)


def test_node_schema_and_execute(build_tiny):
    schema = ClearIntervene.define_schema()
    assert schema.node_id == "ConceptErasureClearIntervene" and schema.category == "concept_erasure/apply"
    tiny = build_tiny("sd15")
    with torch.inference_mode():
        enc = ComfyTextEncoder(tiny.clip, "clip_l")
        patch = ErasurePatch("clear", "sd15", clear_modules=(_crafted(tiny.clip, enc, 1, TARGET),))
        out = ClearIntervene.execute(tiny.clip, patch, 1.0, -1)
    assert out.result[0] is not tiny.clip and out.result[0].patcher.object_patches


@pytest.mark.parametrize("family", ["sdxl", "flux", "wan21"])
def test_fit_runs_under_inference_mode_with_fp16_te(build_tiny, family):
    tiny = build_tiny(family, te_dtype=torch.float16)
    request = ConceptRequest.create("a dog", preset="object")
    calls = []
    with torch.inference_mode():
        result = fit_clear(
            tiny.model,
            tiny.clip,
            request,
            seed=0,
            progress=lambda d, t: calls.append((d, t)),
            search_steps=20,
            finetune_steps=10,
            background=4,
        )
        patch = result.patch
        (module,) = patch.clear_modules
        enc = ComfyTextEncoder(tiny.clip, module.encoder)
        edited = apply_clear(tiny.clip, patch, 1.0)
        rows = {t: (_hits(tiny.clip, enc, module, t), _encode(tiny.clip, t)) for t in [TARGET, *UNRELATED]}
        edited.load_model()
        changed = {t: not all(torch.equal(x, y) for x, y in zip(_encode(edited, t), rows[t][1])) for t in rows}
    expected = {"sdxl": "clip_g", "flux": "t5xxl", "wan21": "umt5xxl"}[family]
    assert module.encoder == expected and patch.model_family == family
    assert patch.fit_config["encoder"] == expected and patch.concept["targets"] == ["a dog"]
    assert {"forget_leakage", "holdout_leakage", "retain_cos", "clear"} <= set(patch.metrics)
    assert patch.fingerprint and result.image.ndim == 3 and result.image.shape[2] == 3
    assert calls and calls[-1][0] == calls[-1][1]
    if family == "sdxl":
        assert module.block < enc.num_blocks - 1  # SDXL reads the penultimate block
    for t, (hit, _) in rows.items():
        assert changed[t] == hit, t
    assert set(OPTIONS) >= {"encoder", "search_steps", "topk"}
