"""The pack's ComfyUI nodes (v3 schema): thin, one feature per file, no tensor math.

Node ids carry the fixed prefix ``ConceptErasure`` and never change once published.
"""

from __future__ import annotations

import importlib

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

#: node modules, each exporting ``NODES`` (a list of ``io.ComfyNode`` classes)
NODE_MODULES = ("load_save", "apply", "clear_intervene", "pure_project", "fit")


def node_list() -> list[type[io.ComfyNode]]:
    """Every node class of the pack, in menu order."""
    out: list[type[io.ComfyNode]] = []
    for name in NODE_MODULES:
        out.extend(importlib.import_module(f".{name}", __name__).NODES)
    return out


class ConceptErasureExtension(ComfyExtension):
    """Registers the pack's nodes with ComfyUI."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
