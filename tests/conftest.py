"""Shared pytest configuration: counts of the ComfyUI tests for CI's summary line."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "comfy"))

from comfy_env import comfyui_missing_reason  # noqa: E402


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: D103
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for status in counts:
        for rep in terminalreporter.stats.get(status, []):
            nodeid = str(getattr(rep, "nodeid", "")).replace("\\", "/")
            if "tests/comfy/" in nodeid and (rep.when == "call" or status == "skipped"):
                counts[status] += 1
    missing = comfyui_missing_reason()
    if missing:
        terminalreporter.write_line(f"ComfyUI tests: 0 ran, all skipped: {missing}")
        return
    ran = counts["passed"] + counts["failed"]
    terminalreporter.write_line(
        f"ComfyUI tests: {ran} ran ({counts['passed']} passed, {counts['failed']} failed), {counts['skipped']} skipped"
    )
