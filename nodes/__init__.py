"""The pack's ComfyUI nodes (v3 schema): thin, one feature per file, no tensor math.

Node ids carry the fixed prefix ``ConceptErasure`` and never change once published.
"""

from __future__ import annotations

import importlib
import logging

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

log = logging.getLogger(__name__)

#: node modules, each exporting ``NODES`` (a list of ``io.ComfyNode`` classes)
NODE_MODULES = ("load_save", "apply", "clear_intervene", "pure_project", "fit")


def node_list() -> list[type[io.ComfyNode]]:
    """Every node class of the pack (modules that are not there yet are skipped with a warning)."""
    out: list[type[io.ComfyNode]] = []
    for name in NODE_MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"nodes.{name}"):
                continue
            raise
        out.extend(module.NODES)
    return out


class ConceptErasureExtension(ComfyExtension):
    """Registers the pack's nodes with ComfyUI."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
