"""Every node has a help page where the ComfyUI frontend looks for it, and a tooltip on every input.

The frontend (``comfyui-frontend-package``, ``NodeHelpService.fetchCustomNodeHelp``) asks for
``/extensions/<pack>/docs/<node id>/<locale>.md`` and falls back to
``/extensions/<pack>/docs/<node id>.md``; ComfyUI serves ``/extensions/<pack>/`` from the
pack's ``WEB_DIRECTORY``. So each page is ``<WEB_DIRECTORY>/docs/<node id>.md``.
"""

from __future__ import annotations

import re
from pathlib import Path

import comfy_env
import pytest

pack = comfy_env.load_pack()

from comfyui_concept_erasure.nodes import node_list  # noqa: E402

DOCS = (comfy_env.REPO / pack.WEB_DIRECTORY / "docs").resolve()
SCHEMAS = [cls.define_schema() for cls in node_list()]
IDS = [s.node_id for s in SCHEMAS]
SECTIONS = ("## Inputs", "## Outputs", "## Typical use", "## Pitfalls")


def _frontend_bundle() -> str | None:
    """The frontend's JS holding the node-help fetch, if the package is installed."""
    try:
        import comfyui_frontend_package
    except ImportError:
        return None
    assets = Path(comfyui_frontend_package.__file__).parent / "static" / "assets"
    for js in sorted(assets.glob("*.js")):
        text = js.read_text(encoding="utf-8", errors="replace")
        if "fetchCustomNodeHelp" in text:
            return text
    return None


def test_pack_has_the_node_ids_and_prefix():
    assert len(IDS) == len(set(IDS)) >= 6
    assert all(i.startswith("ConceptErasure") for i in IDS)


@pytest.mark.parametrize("schema", SCHEMAS, ids=IDS)
def test_every_input_and_output_has_a_tooltip(schema):
    assert (schema.description or "").strip(), f"{schema.node_id}: no description"
    missing = [i.id for i in schema.inputs if not (i.tooltip or "").strip()]
    assert not missing, f"{schema.node_id}: inputs without tooltip: {missing}"
    missing = [o.display_name or o.io_type for o in schema.outputs if not (o.tooltip or "").strip()]
    assert not missing, f"{schema.node_id}: outputs without tooltip: {missing}"


@pytest.mark.parametrize("schema", SCHEMAS, ids=IDS)
def test_every_node_has_a_docs_page_naming_each_input(schema):
    page = DOCS / f"{schema.node_id}.md"
    assert page.is_file(), f"missing help page {page.relative_to(comfy_env.REPO)}"
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# {schema.display_name}\n")
    for section in SECTIONS:
        assert section in text, f"{page.name}: no {section!r} section"
    inputs = text.split("## Inputs", 1)[1].split("\n## ", 1)[0]
    for inp in schema.inputs:
        assert re.search(rf"\*\*{re.escape(inp.id)}\*\*", inputs), f"{page.name}: input {inp.id!r} not described"
    outputs = text.split("## Outputs", 1)[1].split("\n## ", 1)[0]
    for out in schema.outputs:
        assert (out.display_name or out.io_type) in outputs, f"{page.name}: output {out.display_name!r} not described"


def test_no_stray_docs_pages():
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert pages == set(IDS), f"pages without a node: {sorted(pages - set(IDS))}"
    assert not [p for p in DOCS.iterdir() if p.is_dir()], "per-locale folders need a page per node id"


def test_frontend_looks_for_docs_where_they_are():
    """The installed frontend's help lookup uses the path convention these pages follow."""
    bundle = _frontend_bundle()
    if bundle is None:
        pytest.skip("comfyui-frontend-package not installed")
    assert "/extensions/${customNodeName}/docs/${node2.name}/${locale}.md" in bundle or re.search(
        r"/extensions/\$\{\w+\}/docs/\$\{\w+\.name\}/\$\{\w+\}\.md", bundle
    )
    assert re.search(r"/extensions/\$\{\w+\}/docs/\$\{\w+\.name\}\.md", bundle)


def test_loaded_pack_serves_each_page_at_the_frontend_url():
    """As loaded by ComfyUI: ``python_module`` -> pack name -> ``EXTENSION_WEB_DIRS`` -> the page file.

    The frontend takes the pack name from ``/object_info``'s ``python_module``
    (``custom_nodes.<pack>``, ``@version`` dropped); the server serves
    ``/extensions/<pack>/`` from ``EXTENSION_WEB_DIRS[<pack>]``.
    """
    from workflow_tools import load_comfy_with_pack

    nodes = load_comfy_with_pack()
    for node_id in IDS:
        module = nodes.NODE_CLASS_MAPPINGS[node_id].RELATIVE_PYTHON_MODULE
        parts = module.split(".")
        assert parts[0] == "custom_nodes" and len(parts) >= 2, module
        name = parts[1].split("@")[0]
        web = Path(nodes.EXTENSION_WEB_DIRS[name])
        assert (web / "docs" / f"{node_id}.md").is_file(), f"/extensions/{name}/docs/{node_id}.md would be 404"
