"""ComfyUI Concept Erasure: ComfyUI entry point.

ComfyUI imports this file from ``custom_nodes/<this folder>/``. Nothing heavy runs
here: the core library ``erasure_core`` is made importable (it sits beside this file
and may also be pip-installed), and ``comfy_entrypoint`` returns the extension whose
node list is imported on demand.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
WEB_DIRECTORY = "./web"


def _ensure_core() -> None:
    """Register the bundled ``erasure_core`` under its own name without exposing ``nodes``/``patches``.

    Adding this folder to ``sys.path`` would let our ``nodes`` package shadow ComfyUI's
    ``nodes`` module; loading just the one package by its file avoids that.
    """
    if "erasure_core" in sys.modules:
        return
    init = os.path.join(_HERE, "erasure_core", "__init__.py")
    spec = importlib.util.spec_from_file_location(
        "erasure_core", init, submodule_search_locations=[os.path.dirname(init)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["erasure_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["erasure_core"]
        raise


_ensure_core()


async def comfy_entrypoint():
    """ComfyUI v3 entry point: the extension that lists this pack's nodes."""
    from .nodes import ConceptErasureExtension

    return ConceptErasureExtension()
