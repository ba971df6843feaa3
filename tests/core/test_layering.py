"""erasure_core is a standalone torch library: it never imports ComfyUI (ARCHITECTURE.md, layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "erasure_core"
FORBIDDEN = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution", "comfy_execution"}
# the pack's own upper layers are just as off limits
FORBIDDEN |= {"patches"}
FILES = sorted(CORE.rglob("*.py"))


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """Absolute module names imported by ``tree`` (``import x``, ``from x import y``, ``import_module("x")``)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def test_core_files_found():
    assert len(FILES) > 10 and CORE / "patch_file.py" in FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CORE)))
def test_no_comfyui_imports(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = [f"{path.name}:{line}: import {mod}" for line, mod in _imports(tree) if mod.split(".")[0] in FORBIDDEN]
    assert not bad, "erasure_core must not import ComfyUI or the pack's upper layers:\n" + "\n".join(bad)


def test_the_checker_sees_every_import_form():
    src = (
        "import comfy.sd\nfrom folder_paths import x\nimport importlib\nimportlib.import_module('nodes')\n"
        "def f():\n    import server\nfrom . import comfy_like\n"
    )
    mods = sorted(m for _, m in _imports(ast.parse(src)))
    assert mods == ["comfy.sd", "folder_paths", "importlib", "nodes", "server"]  # relative imports are ours
