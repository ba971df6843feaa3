"""The pack's graphs run through ComfyUI's real executor (``execution.PromptExecutor``) on tiny models.

ComfyUI's loaders are replaced by test-only nodes registered in ``nodes.NODE_CLASS_MAPPINGS``
for this module (removed afterwards): ``TinyCheckpointLoader`` returns a tiny MODEL + CLIP
of one family (the same objects on every call, like a cached real loader), and
``TinyProbe`` is an output node that records what reaches it and, given a MODEL and CLIP,
samples one step with them (so ComfyUI really patches the weights in place). The
``erasure_patches`` folder is redirected to a temp dir. Covered: fit -> save (file, report,
summary; a second run is cached: no second file, no double edit), load -> apply (the
edit is exactly the patch; the graph without the apply node gives the original model
bit for bit), interrupt during a fit (no file, ``execution_interrupted``), save never
overwrites, the load list refreshes, and a wrong-family patch is refused naming both.
"""

from __future__ import annotations

import importlib
import uuid
from typing import Any

import comfy_env
import pytest
import torch
from workflow_tools import load_comfy_with_pack

comfy_env.load_pack()

import comfy.model_management as mm  # noqa: E402
import execution  # noqa: E402
import folder_paths  # noqa: E402
import tiny_models  # noqa: E402
from comfyui_concept_erasure.patches.apply import effective_weight  # noqa: E402

from erasure_core.patch_file import ErasurePatch  # noqa: E402

_TINY: dict[str, tiny_models.TinyFamily] = {}
#: label -> what the probe node received (cleared by ``run``)
PROBE: dict[str, dict[str, Any]] = {}
#: PURE on tiny sd15 in about a second; ~30 progress calls (the interrupt test needs several)
FAST_PURE = "seeds=1\nresolution=64\nthreshold=1.0\ncfg=2.0"


def tiny(family: str) -> tiny_models.TinyFamily:
    """One tiny build per family for the whole module (a real loader node is cached the same way)."""
    if family not in _TINY:
        _TINY[family] = tiny_models.build(family)
    return _TINY[family]


class TinyCheckpointLoader:
    """Test stand-in for CheckpointLoaderSimple: a tiny MODEL + CLIP of one family."""

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"family": (list(tiny_models.FAMILIES),)}}

    def load(self, family):
        t = tiny(family)
        return (t.model, t.clip)


class TinyProbe:
    """Test output node: records its inputs under ``label``; with MODEL + CLIP, samples one step."""

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {
            "required": {"label": ("STRING", {"default": "probe"})},
            "optional": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "patch": ("ERASURE_PATCH",),
                "image": ("IMAGE",),
                "summary": ("STRING", {"forceInput": True}),
                "family": ("STRING", {"default": ""}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):  # noqa: N802
        return float("nan")  # always run (the probe records per run)

    def probe(self, label, model=None, clip=None, patch=None, image=None, summary=None, family=""):
        got = {"model": model, "clip": clip, "patch": patch, "image": image, "summary": summary}
        if model is not None and clip is not None and family:
            got["latent"] = tiny(family).sample(model=model, clip=clip, steps=1).clone()
        PROBE[label] = got
        return {}


TEST_NODES = {"TinyCheckpointLoader": TinyCheckpointLoader, "TinyProbe": TinyProbe}


class StubServer:
    """What ``PromptExecutor`` needs of ComfyUI's ``PromptServer``: records every message it sends."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))


@pytest.fixture(scope="module")
def comfy_nodes():
    nodes = load_comfy_with_pack()
    clash = set(TEST_NODES) & set(nodes.NODE_CLASS_MAPPINGS)
    assert not clash, f"test node names taken: {clash}"
    nodes.NODE_CLASS_MAPPINGS.update(TEST_NODES)
    yield nodes
    for name in TEST_NODES:
        nodes.NODE_CLASS_MAPPINGS.pop(name, None)
    mm.unload_all_models()


@pytest.fixture
def patch_dir(tmp_path, monkeypatch, comfy_nodes):
    """``models/erasure_patches`` is a fresh temp folder (ComfyUI's folder table restored afterwards)."""
    models = tmp_path / "models"
    folder = models / "erasure_patches"
    folder.mkdir(parents=True)
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "erasure_patches", ([str(folder)], {".safetensors"}))
    folder_paths.filename_list_cache.clear()
    yield folder
    folder_paths.filename_list_cache.clear()


def run(executor: execution.PromptExecutor, prompt: dict) -> list[tuple[str, dict]]:
    """Validate ``prompt`` with ComfyUI's ``validate_prompt``, execute it, return the messages it sent."""
    import asyncio

    PROBE.clear()
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid, f"{error} {node_errors}"
    start = len(executor.server.messages)
    executor.execute(prompt, prompt_id, {"client_id": "test"}, outputs)
    return executor.server.messages[start:]


def events(messages) -> list[str]:
    return [m[0] for m in messages]


def error_message(messages) -> str:
    errors = [d for e, d in messages if e == "execution_error"]
    assert errors, f"expected an execution error, got {events(messages)}"
    return errors[0]["exception_message"]


def fit_prompt(family: str = "sd15", prefix: str = "test/eraser", save: bool = True) -> dict:
    """Loader -> Fit (PURE, fast options) -> Save, with a probe on the patch, report and summary."""
    prompt = {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"family": family}},
        "2": {
            "class_type": "ConceptErasureFit",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "method": "PURE",
                "targets": "dog",
                "anchor": "",
                "retain": "cat\ncar",
                "preset": "object",
                "paraphrases": "",
                "seed": 0,
                "steps": 1,
                "rank": 0,
                "gamma": 1.0,
                "encoder": "auto",
                "advanced": FAST_PURE,
            },
        },
        "4": {
            "class_type": "TinyProbe",
            "inputs": {"label": "fit", "patch": ["2", 0], "image": ["2", 1], "summary": ["2", 2]},
        },
    }
    if save:
        prompt["3"] = {
            "class_type": "ConceptErasureSavePatch",
            "inputs": {"patch": ["2", 0], "filename_prefix": prefix},
        }
    return prompt


def apply_prompt(patch_name: str | None, family: str = "sd15", strength: float = 1.0) -> dict:
    """Loader (-> LoadPatch -> ApplyPatch) -> probe that samples one step; ``None``: no patch nodes."""
    src = ["1", 0], ["1", 1]
    prompt = {"1": {"class_type": "TinyCheckpointLoader", "inputs": {"family": family}}}
    if patch_name is not None:
        prompt["5"] = {"class_type": "ConceptErasureLoadPatch", "inputs": {"patch_name": patch_name}}
        prompt["6"] = {
            "class_type": "ConceptErasureApplyPatch",
            "inputs": {"model": src[0], "clip": src[1], "patch": ["5", 0], "strength": strength},
        }
        src = ["6", 0], ["6", 1]
    prompt["7"] = {
        "class_type": "TinyProbe",
        "inputs": {"label": "out", "model": src[0], "clip": src[1], "family": family},
    }
    return prompt


def state(family: str) -> dict[str, torch.Tensor]:
    """The tiny MODEL's and CLIP's module weights as they are in memory now."""
    t = tiny(family)
    out = {f"model.{k}": v.detach().clone() for k, v in t.model.model.state_dict().items()}
    out.update({f"clip.{k}": v.detach().clone() for k, v in t.clip.cond_stage_model.state_dict().items()})
    return out


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"weights changed: {changed[:5]}"


def saved_patch(folder, family: str = "sd15") -> str:
    """A fitted patch file in ``folder`` (fitted by ComfyUI's executor), returns its listed name."""
    executor = execution.PromptExecutor(StubServer())
    run(executor, fit_prompt(family, prefix=f"{family}_eraser"))
    return f"{family}_eraser.safetensors"


def test_fit_save_through_executor_then_cached(patch_dir):
    before = state("sd15")
    executor = execution.PromptExecutor(StubServer())
    msgs = run(executor, fit_prompt())
    assert "execution_success" in events(msgs), events(msgs)
    files = sorted(p.relative_to(patch_dir).as_posix() for p in patch_dir.rglob("*.safetensors"))
    assert files == ["test/eraser.safetensors"]
    saved = ErasurePatch.load(patch_dir / files[0])
    got = PROBE["fit"]
    assert saved.method.lower() == "pure" and saved.model_family == "sd15" and saved.deltas
    assert {d.key for d in saved.deltas} == {d.key for d in got["patch"].deltas}
    for a, b in zip(sorted(saved.deltas, key=lambda d: d.key), sorted(got["patch"].deltas, key=lambda d: d.key)):
        assert torch.allclose(a.delta(), b.delta(), atol=1e-6)
    image = got["image"]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[1] > 32
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0
    assert "PURE" in got["summary"] and "retain" in got["summary"]
    ui = executor.history_result["outputs"]["3"]
    assert ui["erasure_patch"] == ["test/eraser.safetensors"]
    assert_same_state(before, state("sd15"))  # fitting never touches the input MODEL/CLIP

    # the same prompt again: every node is cached, Save does not write a second file, nothing is re-fitted
    first = got["patch"]
    msgs = run(executor, fit_prompt())
    cached = next(d for e, d in msgs if e == "execution_cached")["nodes"]
    assert {"1", "2", "3"} <= set(cached), cached
    assert [d["node"] for e, d in msgs if e == "executing" and d["node"]] == ["4"]
    assert sorted(p.name for p in patch_dir.rglob("*.safetensors")) == ["eraser.safetensors"]
    assert PROBE["fit"]["patch"] is first
    assert_same_state(before, state("sd15"))


def test_load_apply_then_remove_is_bit_identical(patch_dir):
    name = saved_patch(patch_dir)
    base = tiny("sd15")
    before = state("sd15")
    executor = execution.PromptExecutor(StubServer())

    run(executor, apply_prompt(None))
    reference = PROBE["out"]["latent"]
    assert PROBE["out"]["model"] is base.model

    assert "execution_success" in events(run(executor, apply_prompt(name)))
    out = PROBE["out"]
    patch = ErasurePatch.load(patch_dir / name)
    assert out["model"] is not base.model  # a clone
    assert patch.model_deltas() and not patch.clip_deltas()  # PURE edits only K/V: the CLIP passes through
    assert out["clip"] is base.clip
    for d in patch.model_deltas():  # strength 1: the effective weight is the base + the stored edit
        w0, w1 = effective_weight(base.model, d.key), effective_weight(out["model"], d.key)
        expected = w0.float().clone()
        target = expected if d.offset is None else expected.narrow(*d.offset)
        target += d.delta()
        assert torch.allclose(w1.float(), expected, atol=1e-3), d.key
        assert not torch.equal(w1, w0), d.key
    assert not torch.equal(out["latent"], reference)  # sampling used the patched weights

    # the graph without the apply node: the model is the original again, bit for bit
    msgs = run(executor, apply_prompt(None))
    assert "execution_success" in events(msgs)
    assert torch.equal(PROBE["out"]["latent"], reference)
    assert not base.model.patches and not base.clip.patcher.patches
    mm.unload_all_models()
    assert_same_state(before, state("sd15"))


def test_apply_strength_zero_is_the_original(patch_dir):
    name = saved_patch(patch_dir)
    executor = execution.PromptExecutor(StubServer())
    run(executor, apply_prompt(None))
    reference = PROBE["out"]["latent"]
    run(executor, apply_prompt(name, strength=0.0))
    assert torch.equal(PROBE["out"]["latent"], reference)


def loaded_pack_module(comfy_nodes, name: str):
    """The executor's copy of ``<pack>.<name>``: ComfyUI imports the pack under its path as module name."""
    root = comfy_nodes.NODE_CLASS_MAPPINGS["ConceptErasureFit"].__module__.rsplit(".nodes.", 1)[0]
    return importlib.import_module(f"{root}.{name}")


def test_interrupt_during_fit_writes_nothing(patch_dir, monkeypatch, comfy_nodes):
    pack_progress = loaded_pack_module(comfy_nodes, "patches.progress")
    real = pack_progress.comfy_progress
    calls: list[tuple[int, int]] = []

    def interrupting(node_id=None):
        update = real(node_id)

        def progress(done, total):
            calls.append((done, total))
            if len(calls) == 3:  # what the server's /interrupt does, mid-fit
                mm.interrupt_current_processing()
            update(done, total)

        return progress

    monkeypatch.setattr(pack_progress, "comfy_progress", interrupting)
    executor = execution.PromptExecutor(StubServer())
    msgs = run(executor, fit_prompt(prefix="interrupted"))
    assert len(calls) == 3  # the fit stopped at the first progress call after the interrupt
    interrupted = [d for e, d in msgs if e == "execution_interrupted"]
    assert interrupted and interrupted[0]["node_type"] == "ConceptErasureFit"
    assert "execution_success" not in events(msgs) and not executor.success
    assert "3" not in interrupted[0]["executed"] and "3" not in executor.history_result["outputs"]
    assert not list(patch_dir.rglob("*")), "an interrupted fit writes nothing"
    assert not mm.processing_interrupted()  # the flag is reset for the next prompt

    monkeypatch.setattr(pack_progress, "comfy_progress", real)  # the next run (not cached) completes
    assert "execution_success" in events(run(executor, fit_prompt(prefix="interrupted")))
    assert [p.name for p in patch_dir.glob("*.safetensors")] == ["interrupted.safetensors"]


def test_save_never_overwrites(patch_dir):
    name = saved_patch(patch_dir)
    first = (patch_dir / name).read_bytes()
    # a fresh executor (e.g. after a restart) fits again and saves under the same prefix
    executor = execution.PromptExecutor(StubServer())
    run(executor, fit_prompt(prefix="sd15_eraser"))
    assert sorted(p.name for p in patch_dir.glob("*.safetensors")) == [
        "sd15_eraser.safetensors",
        "sd15_eraser_00001.safetensors",
    ]
    assert (patch_dir / name).read_bytes() == first
    assert executor.history_result["outputs"]["3"]["erasure_patch"] == ["sd15_eraser_00001.safetensors"]
    # same inputs and seed -> the same fit
    a, b = ErasurePatch.load(patch_dir / name), ErasurePatch.load(patch_dir / "sd15_eraser_00001.safetensors")
    assert [d.key for d in a.deltas] == [d.key for d in b.deltas]
    assert all(torch.allclose(x.delta(), y.delta(), atol=1e-6) for x, y in zip(a.deltas, b.deltas))


def test_load_list_refreshes_when_a_file_is_added(patch_dir, comfy_nodes):
    load = comfy_nodes.NODE_CLASS_MAPPINGS["ConceptErasureLoadPatch"]

    def listed() -> list[str]:
        return list(load.INPUT_TYPES()["required"]["patch_name"][1]["options"])  # what /object_info serves

    assert listed() == []
    name = saved_patch(patch_dir)
    assert listed() == [name]
    sub = patch_dir / "more"
    sub.mkdir()
    (sub / "copy.safetensors").write_bytes((patch_dir / name).read_bytes())
    (patch_dir / "notes.txt").write_text("not a patch")
    assert listed() == ["more/copy.safetensors", name]


def test_wrong_family_is_refused_naming_both(patch_dir):
    from comfyui_concept_erasure.patches.families import family_display

    name = saved_patch(patch_dir)
    executor = execution.PromptExecutor(StubServer())
    msgs = run(executor, apply_prompt(name, family="flux"))
    text = error_message(msgs)
    assert family_display("sd15") in text and family_display("flux") in text, text
    assert "Fit Concept Eraser" in text
    assert not executor.success and "out" not in PROBE


def test_clear_patch_on_another_families_clip_is_refused(patch_dir):
    """CLEAR Layer Intervene with an SD1.5 (CLIP-L) CLEAR patch on Wan's umT5 CLIP: refused, naming both."""
    from comfyui_concept_erasure.patches.families import family_display

    from erasure_core.patch_file import ClearModule

    m, d = 8, 4
    module = ClearModule(
        "clip_l",
        0,
        "clip_l.transformer.text_model.encoder.layers.0",
        torch.zeros(m, d),
        torch.zeros(m),
        torch.zeros(d, m),
        torch.zeros(d),
        torch.ones(m, dtype=torch.bool),
        1.0,
    )
    ErasurePatch("clear", "sd15", clear_modules=(module,)).save(patch_dir / "clear_sd15.safetensors")
    prompt = {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"family": "wan21"}},
        "5": {"class_type": "ConceptErasureLoadPatch", "inputs": {"patch_name": "clear_sd15.safetensors"}},
        "6": {
            "class_type": "ConceptErasureClearIntervene",
            "inputs": {"clip": ["1", 1], "patch": ["5", 0], "gamma": 1.0, "layer_override": -1},
        },
        "7": {"class_type": "TinyProbe", "inputs": {"label": "out", "clip": ["6", 0]}},
    }
    executor = execution.PromptExecutor(StubServer())
    text = error_message(run(executor, prompt))
    assert family_display("sd15") in text and family_display("wan21") in text, text
    assert "clip_l" in text
