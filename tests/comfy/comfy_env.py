"""Importing the real ComfyUI in tests (CPU mode), and building tiny models in its real classes.

ComfyUI is found at ``$COMFYUI_PATH``, else ``~/ComfyUI`` (COMFYUI.md §5). It is put on
``sys.path``, switched to CPU mode before ``comfy.model_management`` is imported, and
torchvision is stubbed (COMFYUI.md §5.2: PyPI torchvision does not import beside the CPU
torch, and ComfyUI only needs it at run time of models we never build).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def comfyui_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or Path.home() / "ComfyUI").expanduser()


def comfyui_missing_reason() -> str | None:
    """Why ComfyUI cannot be imported, or ``None`` if it can."""
    path = comfyui_path()
    if not (path / "comfy" / "model_patcher.py").is_file():
        return f"ComfyUI not found at {path} (set COMFYUI_PATH to a ComfyUI checkout; see README 'Tests')"
    return None


_READY = False


def stub_torchvision() -> None:
    """Replace torchvision by an empty stub when it does not import (COMFYUI.md §5.2).

    ``transformers`` (and its tokenizers) must be imported first: they probe torchvision.
    """
    import transformers  # noqa: F401
    from transformers import CLIPTokenizer, T5TokenizerFast  # noqa: F401

    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        tv = types.ModuleType("torchvision")
        tv.__path__ = []
        tr = types.ModuleType("torchvision.transforms")
        tr.__path__ = []
        tv.transforms = tr
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.transforms"] = tr


def setup_comfyui() -> Path:
    """Make ``import comfy...`` work in this process, in CPU mode. Idempotent."""
    global _READY
    path = comfyui_path()
    if _READY:
        return path
    stub_torchvision()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = True
    args.disable_api_nodes = True
    import comfy.model_management  # noqa: F401

    _READY = True
    return path


PACK_NAME = "comfyui_concept_erasure"


def load_pack():
    """Import the repository as the package ComfyUI would load (``custom_nodes/<dir>/__init__.py``)."""
    import importlib.util

    setup_comfyui()
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module
