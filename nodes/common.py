"""Shared node pieces: the custom wire type, the category, the id prefix."""

from __future__ import annotations

from comfy_api.latest import io

NODE_PREFIX = "ConceptErasure"
CATEGORY = "concept_erasure"

#: the wire that carries an ``erasure_core.patch_file.ErasurePatch`` between nodes
ErasurePatchType = io.Custom("ERASURE_PATCH")
