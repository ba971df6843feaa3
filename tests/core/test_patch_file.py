"""ErasurePatch file format: exact round trips, atomic saves, one clear error per malformed file."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from erasure_core.errors import PatchFileError
from erasure_core.patch_file import (
    FORMAT_VERSION,
    ClearModule,
    ErasurePatch,
    WeightDelta,
    fingerprints_match,
    make_delta,
    weight_fingerprint,
)

MODEL_KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CLIP_KEY = "clip_l.transformer.text_model.encoder.layers.3.self_attn.v_proj.weight"
QKV_KEY = "diffusion_model.double_blocks.0.txt_attn.qkv.weight"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clear_module(seed: int = 0, *, m: int = 24, d: int = 16) -> ClearModule:
    g = _gen(seed)
    return ClearModule(
        encoder="clip_l",
        block=5,
        block_path="clip_l.transformer.text_model.encoder.layers.5",
        W_enc=torch.randn(m, d, generator=g),
        b_enc=torch.randn(m, generator=g),
        W_dec=torch.randn(d, m, generator=g),
        b_dec=torch.randn(d, generator=g),
        mask=torch.rand(m, generator=g) > 0.5,
        scale=3.0517578125e-05 * 7.1,
        topk=4,
        default_strength=0.75,
        concept="Van Gogh",
    )


def _full_patch() -> ErasurePatch:
    g = _gen(1)
    low = WeightDelta(MODEL_KEY, "model", up=torch.randn(40, 2, generator=g), down=torch.randn(2, 32, generator=g))
    dense = WeightDelta(
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight",
        "model",
        dense=torch.randn(40, 32, generator=g),
    )
    clip_low = WeightDelta(CLIP_KEY, "clip", up=torch.randn(16, 1, generator=g), down=torch.randn(1, 16, generator=g))
    clip_dense = WeightDelta(
        "clip_l.transformer.text_model.encoder.layers.3.mlp.fc2.weight", "clip", dense=torch.randn(16, 8, generator=g)
    )
    # Flux-style fused qkv (3H x H): the K and V row slices, (0, H, H) and (0, 2H, H)
    k_slice = WeightDelta(
        QKV_KEY, "model", up=torch.randn(8, 1, generator=g), down=torch.randn(1, 8, generator=g), offset=(0, 8, 8)
    )
    v_slice = WeightDelta(QKV_KEY, "model", dense=torch.randn(8, 8, generator=g), offset=(0, 16, 8))
    custom = WeightDelta(
        "diffusion_model.out.2.weight",
        "model",
        up=torch.randn(12, 1, generator=g).to(torch.float16),
        down=torch.randn(1, 12, generator=g).to(torch.float16),
        lora_name="lora_unet_out_2",
    )
    bf16 = WeightDelta("diffusion_model.out.0.weight", "model", dense=torch.randn(6, 6, generator=g).bfloat16())
    return ErasurePatch(
        "erasepro",
        "flux",
        deltas=(low, dense, clip_low, clip_dense, k_slice, v_slice, custom, bf16),
        clear_modules=(_clear_module(0), _clear_module(1, m=10, d=16)),
        concept={"targets": ["Van Gogh", "Picasso"], "anchor": "", "retain": ["Monet"], "preset": "style"},
        fit_config={"lam": 0.1, "tol": 1e-3, "stages": [[0, 1], [2]], "nested": {"flag": True, "none": None}},
        fingerprint={MODEL_KEY: {"shape": [40, 32], "mean": 0.0012, "std": 0.02, "absmean": 0.016}},
        metrics={"forget_leakage": 0.0312, "retain_cos": 0.99931, "unicode": "Ünïcødé ✓"},
    )


def _assert_same_patch(a: ErasurePatch, b: ErasurePatch) -> None:
    assert (a.method, a.model_family, a.pack_version) == (b.method, b.model_family, b.pack_version)
    assert (a.concept, a.fit_config, a.fingerprint, a.metrics) == (b.concept, b.fit_config, b.fingerprint, b.metrics)
    assert len(a.deltas) == len(b.deltas)
    for x, y in zip(a.deltas, b.deltas):
        assert (x.key, x.target, x.offset, x.lora_name, x.is_low_rank) == (
            y.key,
            y.target,
            y.offset,
            y.lora_name,
            y.is_low_rank,
        )
        for part in ("up", "down", "dense"):
            tx, ty = getattr(x, part), getattr(y, part)
            assert (tx is None) == (ty is None), part
            if tx is not None:
                assert tx.dtype == ty.dtype and torch.equal(tx, ty), (x.key, part)
    assert len(a.clear_modules) == len(b.clear_modules)
    for x, y in zip(a.clear_modules, b.clear_modules):
        for f in ("encoder", "block", "block_path", "scale", "topk", "default_strength", "concept"):
            assert getattr(x, f) == getattr(y, f), f
        for t in ("W_enc", "b_enc", "W_dec", "b_dec", "mask"):
            tx, ty = getattr(x, t), getattr(y, t)
            assert tx.dtype == ty.dtype and torch.equal(tx, ty), t
        assert y.mask.dtype == torch.bool


# ----------------------------------------------------------------------------- round trips
def test_round_trip_is_exact_for_every_kind_of_content(tmp_path):
    patch = _full_patch()
    path = patch.save(tmp_path / "full.safetensors")
    loaded = ErasurePatch.load(path)
    _assert_same_patch(patch, loaded)
    # and a second save of the loaded patch writes the same payload
    t1, m1 = patch.to_tensors()
    t2, m2 = loaded.to_tensors()
    assert m1 == m2 and t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)


@pytest.mark.parametrize(
    "delta",
    [
        pytest.param(make_delta(MODEL_KEY, "model", torch.randn(40, 3), torch.randn(3, 32)), id="model-lowrank"),
        pytest.param(WeightDelta(MODEL_KEY, "model", dense=torch.randn(40, 32)), id="model-dense"),
        pytest.param(make_delta(CLIP_KEY, "clip", torch.randn(16, 2), torch.randn(2, 16)), id="clip-lowrank"),
        pytest.param(WeightDelta(CLIP_KEY, "clip", dense=torch.randn(16, 16)), id="clip-dense"),
        pytest.param(
            make_delta(QKV_KEY, "model", torch.randn(8, 1), torch.randn(1, 8), offset=(0, 8, 8)), id="flux-offset"
        ),
        pytest.param(
            make_delta(MODEL_KEY, "model", torch.randn(40, 1), torch.randn(1, 32), lora_name="lora_unet_x_attn2_to_k"),
            id="custom-lora-name",
        ),
        pytest.param(
            make_delta("diffusion_model.a.diff_proj.weight", "model", torch.randn(8, 1), torch.randn(1, 8)),
            id="key-containing-.diff",
        ),
        pytest.param(
            WeightDelta(MODEL_KEY, "model", dense=torch.randn(40, 32), lora_name="lora_unet_b.diff_x"),
            id="dense-lora-name-containing-.diff",
        ),
    ],
)
def test_round_trip_single_delta(tmp_path, delta):
    patch = ErasurePatch("uce", "sd15", deltas=(delta,))
    loaded = ErasurePatch.load(patch.save(tmp_path / "one.safetensors"))
    _assert_same_patch(patch, loaded)
    assert loaded.deltas[0].file_base == delta.file_base


def test_clear_only_patch_round_trip(tmp_path):
    patch = ErasurePatch("clear", "hf", clear_modules=(_clear_module(3),), concept={"targets": ["dog"]})
    loaded = ErasurePatch.load(patch.save(tmp_path / "clear.safetensors"))
    _assert_same_patch(patch, loaded)
    assert loaded.deltas == ()


def test_empty_metadata_dicts_round_trip(tmp_path):
    patch = ErasurePatch("pure", "wan21", deltas=(WeightDelta(MODEL_KEY, "model", dense=torch.zeros(4, 4)),))
    loaded = ErasurePatch.load(patch.save(tmp_path / "empty.safetensors"))
    _assert_same_patch(patch, loaded)


def test_file_names_follow_the_lora_loader():
    patch = _full_patch()
    tensors, metadata = patch.to_tensors()
    names = set(tensors)
    base = MODEL_KEY.removesuffix(".weight")
    assert {f"{base}.lora_up.weight", f"{base}.lora_down.weight"} <= names
    assert "text_encoders." + CLIP_KEY.removesuffix(".weight") + ".lora_up.weight" in names
    assert "lora_unet_out_2.lora_up.weight" in names
    assert any(n.endswith(".diff") for n in names)
    assert "erasure_clear.0.mask" in names and tensors["erasure_clear.0.mask"].dtype == torch.uint8
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["format_version"] == str(FORMAT_VERSION)


# ----------------------------------------------------------------------------- make_delta
@pytest.mark.parametrize(
    ("d_out", "d_in", "r", "low_rank"),
    [
        (40, 32, 1, True),
        (40, 32, 15, True),
        (40, 32, 16, False),
        (40, 32, 20, False),
        (8, 64, 3, True),
        (8, 64, 4, False),
    ],
)
def test_make_delta_rank_rule(d_out, d_in, r, low_rank):
    g = _gen(2)
    up, down = torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)
    d = make_delta("k.weight", "model", up, down)
    assert d.is_low_rank is low_rank  # low rank iff r < min(d_out, d_in) / 2
    assert d.shape == (d_out, d_in)
    torch.testing.assert_close(d.delta(), up @ down, rtol=1e-5, atol=1e-5)
    if low_rank:
        assert torch.equal(d.up, up) and torch.equal(d.down, down)
        assert d.numel() == r * (d_out + d_in)
    else:
        assert d.dense.shape == (d_out, d_in) and d.numel() == d_out * d_in


def test_make_delta_keeps_dtype_offset_and_name():
    d = make_delta(
        "k.weight", "clip", torch.randn(4, 4).half(), torch.randn(4, 4).half(), offset=(0, 4, 4), lora_name="x"
    )
    assert not d.is_low_rank and d.dense.dtype == torch.float16 and d.offset == (0, 4, 4) and d.lora_name == "x"


def test_weight_delta_validation():
    with pytest.raises(PatchFileError, match="either up and down factors or a dense tensor"):
        WeightDelta("k", "model")
    with pytest.raises(PatchFileError, match="either up and down factors or a dense tensor"):
        WeightDelta("k", "model", up=torch.zeros(2, 1), down=torch.zeros(1, 2), dense=torch.zeros(2, 2))
    with pytest.raises(PatchFileError, match=r"must be \(d_out, r\) and \(r, d_in\)"):
        WeightDelta("k", "model", up=torch.zeros(2, 1), down=torch.zeros(2, 2))
    with pytest.raises(PatchFileError, match="target must be 'model' or 'clip'"):
        WeightDelta("k", "vae", dense=torch.zeros(2, 2))
    with pytest.raises(PatchFileError, match="appears twice"):
        ErasurePatch("uce", "sd15", deltas=(WeightDelta("k", "model", dense=torch.zeros(2, 2)),) * 2)
    with pytest.raises(PatchFileError, match="unknown method"):
        ErasurePatch("magic", "sd15")
    with pytest.raises(PatchFileError, match="unknown model family"):
        ErasurePatch("uce", "sd3")


# ----------------------------------------------------------------------------- saving
def test_save_refuses_to_overwrite(tmp_path):
    patch = _full_patch()
    path = patch.save(tmp_path / "p.safetensors")
    before = path.read_bytes()
    other = ErasurePatch("uce", "sd15", deltas=(WeightDelta(MODEL_KEY, "model", dense=torch.ones(2, 2)),))
    with pytest.raises(FileExistsError, match="already exists"):
        other.save(path)
    assert path.read_bytes() == before
    other.save(path, overwrite=True)
    assert ErasurePatch.load(path).method == "uce"


def test_save_refuses_other_suffixes(tmp_path):
    with pytest.raises(PatchFileError, match=r"end in \.safetensors"):
        _full_patch().save(tmp_path / "p.pt")
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    patch = _full_patch()
    path = patch.save(tmp_path / "sub" / "p.safetensors")  # creates the folder
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.safetensors"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644  # readable like any model file, not mkstemp's 0600
    before = path.read_bytes()

    import erasure_core.patch_file as pf

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pf, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        patch.save(path, overwrite=True)
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.safetensors"]  # temporary file removed


# ----------------------------------------------------------------------------- malformed files
def _write(tmp_path, tensors, metadata, name="bad.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def _payload():
    return _full_patch().to_tensors()


def _index(metadata):
    return json.loads(metadata["erasure_index"])


def test_missing_format_version(tmp_path):
    tensors, metadata = _payload()
    del metadata["format_version"]
    with pytest.raises(PatchFileError, match="has no 'format_version' in its metadata"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


@pytest.mark.parametrize("version", ["2", "0", "1.0", "v1", ""])
def test_unknown_format_version(tmp_path, version):
    tensors, metadata = _payload()
    metadata["format_version"] = version
    with pytest.raises(PatchFileError, match=rf"has format version '{version}'; this pack reads version 1"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


def test_plain_lora_file_is_not_our_format(tmp_path):
    g = _gen(3)
    lora = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(8, 4, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }
    path = _write(tmp_path, lora, {"ss_network_dim": "4"}, "my_lora.safetensors")
    with pytest.raises(PatchFileError, match=r"my_lora\.safetensors is not a concept-erasure patch.*Load LoRA"):
        ErasurePatch.load(path)
    path = _write(tmp_path, lora, None, "no_meta.safetensors")
    with pytest.raises(PatchFileError, match="is not a concept-erasure patch"):
        ErasurePatch.load(path)


@pytest.mark.parametrize("field", ["concept", "fit_config", "fingerprint", "metrics", "erasure_index"])
def test_bad_json_in_a_metadata_field(tmp_path, field):
    tensors, metadata = _payload()
    metadata[field] = '{"unterminated": '
    with pytest.raises(PatchFileError, match=rf"metadata field '{field}' is not valid JSON"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


def test_json_metadata_field_that_is_not_an_object(tmp_path):
    tensors, metadata = _payload()
    metadata["metrics"] = "[1, 2]"
    with pytest.raises(PatchFileError, match="metadata field 'metrics' must be a JSON object"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


@pytest.mark.parametrize("field", ["method", "model_family", "pack_version", "concept", "erasure_index"])
def test_metadata_field_missing(tmp_path, field):
    tensors, metadata = _payload()
    del metadata[field]
    with pytest.raises(PatchFileError, match=rf"metadata field '{field}' is missing"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


def test_wrong_dtype(tmp_path):
    tensors, metadata = _payload()
    name = MODEL_KEY.removesuffix(".weight") + ".lora_up.weight"
    tensors[name] = torch.ones(tensors[name].shape, dtype=torch.int32)
    with pytest.raises(PatchFileError, match=rf"tensor '{name}' has dtype torch.int32, expected a floating-point"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


def test_wrong_mask_dtype(tmp_path):
    tensors, metadata = _payload()
    tensors["erasure_clear.0.mask"] = tensors["erasure_clear.0.mask"].float()
    with pytest.raises(PatchFileError, match=r"erasure_clear\.0\.mask has dtype torch.float32, expected uint8 or bool"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


def test_shape_mismatch_against_the_index(tmp_path):
    tensors, metadata = _payload()
    index = _index(metadata)
    index["deltas"][0]["shape"] = [41, 32]
    metadata["erasure_index"] = json.dumps(index)
    with pytest.raises(PatchFileError, match=r"has shape \(40, 32\), index says \(41, 32\)"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


def test_tensor_shape_mismatch_against_the_index(tmp_path):
    tensors, metadata = _payload()
    dense = [n for n in tensors if n.endswith(".diff")][0]
    tensors[dense] = torch.zeros(tensors[dense].shape[0] + 1, tensors[dense].shape[1])
    with pytest.raises(PatchFileError, match="index says"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


def test_clear_module_shape_mismatch(tmp_path):
    tensors, metadata = _payload()
    tensors["erasure_clear.1.b_dec"] = torch.zeros(5)
    with pytest.raises(PatchFileError, match=r"b_dec has shape \(5,\), expected \(16,\)"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


def test_missing_tensor_listed_in_the_index(tmp_path):
    tensors, metadata = _payload()
    name = "text_encoders." + CLIP_KEY.removesuffix(".weight") + ".lora_down.weight"
    del tensors[name]
    with pytest.raises(PatchFileError, match=rf"tensor '{name}' listed in the index is missing from the file"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


def test_extra_unlisted_tensor(tmp_path):
    tensors, metadata = _payload()
    tensors["sneaky.extra.weight"] = torch.zeros(3)
    with pytest.raises(PatchFileError, match=r"tensors not listed in the index: sneaky\.extra\.weight"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_values(tmp_path, bad):
    tensors, metadata = _payload()
    name = "erasure_clear.0.W_enc"
    tensors[name] = tensors[name].clone()
    tensors[name][1, 2] = bad
    with pytest.raises(PatchFileError, match=rf"tensor '{name}' contains NaN or infinite values"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


def test_malformed_index(tmp_path):
    tensors, metadata = _payload()
    index = _index(metadata)
    del index["deltas"][0]["key"]
    metadata["erasure_index"] = json.dumps(index)
    with pytest.raises(PatchFileError, match="the erasure index is malformed"):
        ErasurePatch.load(_write(tmp_path, tensors, metadata))


def test_truncated_file(tmp_path):
    path = _full_patch().save(tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PatchFileError, match=r"cut\.safetensors is not a readable safetensors file \(truncated"):
        ErasurePatch.load(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(64))
    with pytest.raises(PatchFileError, match="is not a readable safetensors file"):
        ErasurePatch.load(path)


def test_nonexistent_path(tmp_path):
    with pytest.raises(PatchFileError, match="no patch file at"):
        ErasurePatch.load(tmp_path / "missing.safetensors")
    with pytest.raises(PatchFileError, match="no patch file at"):
        ErasurePatch.load(tmp_path)  # a folder is not a file


# ----------------------------------------------------------------------------- fingerprints
def test_fingerprint_matches_lower_precision_copies():
    w = torch.randn(320, 768, generator=_gen(4)) * 0.02
    fp = weight_fingerprint(w)
    assert fp["shape"] == [320, 768]
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        assert fingerprints_match(fp, weight_fingerprint(w.to(dtype))), dtype
    assert fingerprints_match(fp, json.loads(json.dumps(fp)))  # survives the metadata JSON


@pytest.mark.parametrize("seed", range(10))
def test_fingerprint_rejects_another_weight_of_the_same_distribution(seed):
    g = _gen(100 + seed)
    a, b = torch.randn(64, 64, generator=g) * 0.02, torch.randn(64, 64, generator=g) * 0.02
    assert not fingerprints_match(weight_fingerprint(a), weight_fingerprint(b))


def test_fingerprint_rejects_other_shapes_and_scales():
    w = torch.randn(64, 64, generator=_gen(5))
    fp = weight_fingerprint(w)
    assert not fingerprints_match(fp, weight_fingerprint(w.reshape(32, 128)))
    assert not fingerprints_match(fp, weight_fingerprint(w.T.contiguous()))
    assert not fingerprints_match(fp, weight_fingerprint(w * 1.5))
    assert not fingerprints_match(fp, weight_fingerprint(w + 0.5))


def test_fingerprint_without_probe_still_compares_statistics():
    w = torch.randn(64, 64, generator=_gen(6))
    old = {k: v for k, v in weight_fingerprint(w).items() if k != "probe"}  # a file written before probes
    assert fingerprints_match(old, weight_fingerprint(w.half()))
    assert not fingerprints_match(old, weight_fingerprint(w * 2))
