"""The ``models/erasure_patches`` folder, registered with ComfyUI's ``folder_paths``.

Paths a user set under ``erasure_patches:`` in ``extra_model_paths.yaml`` are read by
ComfyUI before custom nodes are imported (COMFYUI.md §1.4); they are kept, first, and
``<models_dir>/erasure_patches`` is appended. Only ``.safetensors`` files are listed.
Registration is lazy (the nodes call these functions) and idempotent.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from erasure_core.errors import PatchFileError

FOLDER = "erasure_patches"
EXTENSIONS = frozenset({".safetensors"})


def register_folder() -> list[str]:
    """Register (or complete) the ``erasure_patches`` folder entry; returns its paths, first = save target."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths = list(folder_paths.folder_names_and_paths[FOLDER][0])
        if default not in paths:
            paths.append(default)
    else:
        paths = [default]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))
    return paths


def patch_files() -> list[str]:
    """The patch files ComfyUI sees (relative names, sub-folders included), sorted."""
    import folder_paths

    register_folder()
    return sorted(folder_paths.get_filename_list(FOLDER))


def patch_path(name: str) -> str:
    """The full path of a listed patch file; raises ``PatchFileError`` if it is not there."""
    import folder_paths

    register_folder()
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise PatchFileError(
            f"no erasure patch named {name!r} in {', '.join(register_folder())}: put the file there "
            "(or refresh the page after adding it)"
        )
    return path


def save_directory() -> Path:
    """Where new patches are written: the first ``erasure_patches`` folder."""
    return Path(register_folder()[0])


_SAFE = re.compile(r"[^\w\-. ]+")


def unique_patch_path(directory: Path, prefix: str) -> Path:
    """``<directory>/<prefix>.safetensors``, or ``<prefix>_00001.safetensors``... if taken (never overwrites).

    ``prefix`` may name sub-folders (``erasers/van_gogh``) but must stay inside ``directory``.
    """
    prefix = prefix.strip().removesuffix(".safetensors") or "erasure_patch"
    parts = [_SAFE.sub("_", p).strip() for p in re.split(r"[\\/]+", prefix) if p.strip()]
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise PatchFileError(
            f"filename_prefix {prefix!r} is not a usable file name: use letters, digits, '_', '-' "
            "and '/' for sub-folders"
        )
    base = directory.joinpath(*parts)
    if os.path.commonpath([os.path.abspath(base), os.path.abspath(directory)]) != os.path.abspath(directory):
        raise PatchFileError(f"filename_prefix {prefix!r} points outside the erasure_patches folder")
    candidate = base.with_name(base.name + ".safetensors")
    counter = 1
    while candidate.exists():
        candidate = base.with_name(f"{base.name}_{counter:05d}.safetensors")
        counter += 1
    return candidate
