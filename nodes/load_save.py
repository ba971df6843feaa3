"""Nodes "Load Erasure Patch" and "Save Erasure Patch": patch files in ``models/erasure_patches``."""

from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from .common import CATEGORY, NODE_PREFIX, ErasurePatchType

log = logging.getLogger(__name__)


class LoadPatch(io.ComfyNode):
    """A ``.safetensors`` patch file from ``models/erasure_patches`` -> ERASURE_PATCH."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..patches.folders import patch_files

        return io.Schema(
            node_id=f"{NODE_PREFIX}LoadPatch",
            display_name="Load Erasure Patch",
            category=f"{CATEGORY}/io",
            description=(
                "Load a concept-erasure patch (CLEAR, PURE, HiRM or ErasePro) from models/erasure_patches. "
                "Connect it to Apply Erasure Patch, CLEAR Layer Intervene or PURE Project K/V."
            ),
            inputs=[
                io.Combo.Input(
                    "patch_name",
                    options=patch_files(),
                    tooltip="A patch file in models/erasure_patches (or a folder set in extra_model_paths.yaml). "
                    "Refresh the page (R) after adding files.",
                ),
            ],
            outputs=[
                ErasurePatchType.Output(
                    display_name="patch",
                    tooltip="The loaded patch: connect it to Apply Erasure Patch, CLEAR Layer Intervene or "
                    "PURE Project K/V.",
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, patch_name: str) -> bool | str:
        """The file must be in an erasure_patches folder (this ComfyUI does not check v3 combos itself)."""
        from ..patches.folders import patch_files, register_folder

        if patch_name in patch_files():
            return True
        return (
            f"erasure patch {patch_name!r} not found in {', '.join(register_folder())}: put the file there, "
            "or pick another one (refresh the page after adding files)"
        )

    @classmethod
    def fingerprint_inputs(cls, patch_name: str) -> str:
        """Re-load when the file changes (same name, new content)."""
        from ..patches.folders import patch_path

        try:
            st = os.stat(patch_path(patch_name))
        except (OSError, ValueError):
            return f"{patch_name}:missing"
        return f"{patch_name}:{st.st_mtime_ns}:{st.st_size}"

    @classmethod
    def execute(cls, patch_name: str) -> io.NodeOutput:
        from erasure_core.patch_file import ErasurePatch

        from ..patches.folders import patch_path

        patch = ErasurePatch.load(patch_path(patch_name))
        log.info("concept erasure: loaded %s (%s, %s)", patch_name, patch.method, patch.model_family)
        return io.NodeOutput(patch)


class SavePatch(io.ComfyNode):
    """ERASURE_PATCH -> a new file in the first ``erasure_patches`` folder (atomic, never overwrites)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{NODE_PREFIX}SavePatch",
            display_name="Save Erasure Patch",
            category=f"{CATEGORY}/io",
            description=(
                "Save a fitted patch as a .safetensors file in models/erasure_patches. An existing file is never "
                "overwritten: a numeric suffix is added. Weight-edit patches also load with the core Load LoRA node."
            ),
            inputs=[
                ErasurePatchType.Input("patch", tooltip="The patch to save (from Fit Concept Eraser)."),
                io.String.Input(
                    "filename_prefix",
                    default="concept_erasure/eraser",
                    tooltip="File name without extension, relative to models/erasure_patches; '/' makes "
                    "sub-folders. If the name is taken, _00001, _00002... is appended.",
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, patch, filename_prefix: str) -> io.NodeOutput:
        from ..patches.folders import save_directory, unique_patch_path

        directory = save_directory()
        for _ in range(100):
            path = unique_patch_path(directory, filename_prefix)
            try:
                patch.save(path)
                break
            except FileExistsError:  # another save took the name in between: try the next suffix
                continue
        else:
            raise FileExistsError(f"could not find a free file name for {filename_prefix!r} in {directory}")
        rel = os.path.relpath(path, directory)
        log.info("concept erasure: saved %s", path)
        return io.NodeOutput(ui={"text": [f"saved {rel} in {directory}"], "erasure_patch": [rel]})


NODES = [LoadPatch, SavePatch]
