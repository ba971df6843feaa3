"""Every example workflow converts to the API format and passes ComfyUI's own validate_prompt with the pack loaded."""

from __future__ import annotations

import json

import comfy_env
import pytest
from workflow_tools import VIRTUAL_NODES, load_comfy_with_pack, model_files, ui_to_api, validate

comfy_env.load_pack()

WORKFLOWS = sorted((comfy_env.REPO / "workflows").glob("*.json"))
EXPECTED = {
    "wan22_ti2v_5b_clear",
    "wan22_fit_clear",
    "sd15_pure",
    "sdxl_erasepro",
    "flux_hirm_pure",
    "stack_two_erasers_lora",
}


@pytest.fixture(scope="module")
def comfy_nodes():
    return load_comfy_with_pack()


@pytest.fixture
def models_dir(tmp_path, comfy_nodes):
    """A temp models dir whose folders come first in ComfyUI's search paths (restored afterwards)."""
    import folder_paths
    from comfyui_concept_erasure.patches.folders import register_folder

    register_folder()
    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    yield tmp_path
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update({k: (v[0], v[1]) for k, v in saved.items()})
    folder_paths.filename_list_cache.clear()


def _placeholders(workflow, models_dir):
    import folder_paths

    for folder, names in model_files(workflow).items():
        d = models_dir / folder
        for name in names:
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(b"")
        folder_paths.add_model_folder_path(folder, str(d), is_default=True)


def test_all_six_workflows_exist():
    assert {p.stem for p in WORKFLOWS} >= EXPECTED


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_converts_and_validates(path, comfy_nodes, models_dir):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    assert workflow["version"] == 0.4
    types = {n["type"] for n in workflow["nodes"]}
    assert types & VIRTUAL_NODES, "every example workflow has a note explaining it"
    unknown = sorted(t for t in types - VIRTUAL_NODES if t not in comfy_nodes.NODE_CLASS_MAPPINGS)
    assert not unknown, f"node types ComfyUI does not know: {unknown}"
    for link in workflow["links"]:  # the link's type is what its source produces
        src = next(n for n in workflow["nodes"] if n["id"] == link[1])
        assert src["outputs"][link[2]]["type"] == link[5]
    _placeholders(workflow, models_dir)
    prompt = ui_to_api(workflow)
    valid, error, outputs, node_errors = validate(prompt)
    assert valid, f"{path.name}: {error} {json.dumps(node_errors, indent=1)[:2000]}"
    assert not node_errors
    output_nodes = [
        i for i, n in prompt.items() if getattr(comfy_nodes.NODE_CLASS_MAPPINGS[n["class_type"]], "OUTPUT_NODE", False)
    ]
    assert sorted(outputs) == sorted(output_nodes)


def test_validation_catches_a_missing_patch_file(comfy_nodes, models_dir):
    """The check is real: without the patch file, the Load node's combo fails validation."""
    workflow = json.loads((comfy_env.REPO / "workflows" / "wan22_ti2v_5b_clear.json").read_text())
    _placeholders(workflow, models_dir)
    (models_dir / "erasure_patches" / "wan22_clear_van_gogh.safetensors").unlink()
    valid, _, _, node_errors = validate(ui_to_api(workflow))
    assert not valid
    kinds = {e["type"] for errs in node_errors.values() for e in errs["errors"]}
    assert kinds & {"value_not_in_list", "custom_validation_failed"}
    assert "wan22_clear_van_gogh.safetensors" in json.dumps(node_errors)


def test_converter_skips_control_values_and_maps_links(comfy_nodes):
    workflow = json.loads((comfy_env.REPO / "workflows" / "wan22_ti2v_5b_clear.json").read_text())
    prompt = ui_to_api(workflow)
    (ks,) = [n for n in prompt.values() if n["class_type"] == "KSampler"]
    assert ks["inputs"]["steps"] == 20 and ks["inputs"]["cfg"] == 5.0
    assert ks["inputs"]["sampler_name"] == "uni_pc" and ks["inputs"]["scheduler"] == "simple"
    assert isinstance(ks["inputs"]["model"], list)
    (shift,) = [n for n in prompt.values() if n["class_type"] == "ModelSamplingSD3"]
    assert shift["inputs"]["shift"] == 8.0
