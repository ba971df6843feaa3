"""Fixtures for the tests that run against the real ComfyUI (see ``comfy_env``).

Without ComfyUI every test here is skipped with one printed reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from comfy_env import comfyui_missing_reason  # noqa: E402

_MISSING = comfyui_missing_reason()
if _MISSING:
    # Test modules import comfy at the top: without ComfyUI they are not collected, and
    # the terminal summary (tests/conftest.py) prints the one reason.
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config):  # noqa: D103
    return f"ComfyUI tests: {'SKIPPED - ' + _MISSING if _MISSING else 'enabled'}"


@pytest.fixture(scope="session")
def pack():
    """The pack imported as a package (what ComfyUI's loader does), named ``comfyui_concept_erasure``."""
    from comfy_env import load_pack

    return load_pack()


@pytest.fixture(params=["sd15", "sdxl", "flux", "wan21", "wan22_5b"])
def tiny(request):
    """A fresh tiny MODEL + CLIP of each family (function scope: tests may patch clones freely)."""
    import tiny_models

    return tiny_models.build(request.param)


@pytest.fixture
def build_tiny():
    """``build_tiny(family, te_dtype=...)``: build one tiny family on demand."""
    import tiny_models

    return tiny_models.build
