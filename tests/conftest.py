"""Shared pytest configuration: counts of the ComfyUI tests for CI's summary line."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "comfy"))

from comfy_env import comfyui_missing_reason  # noqa: E402


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: D103
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for status in counts:
        for rep in terminalreporter.stats.get(status, []):
            if "tests/comfy/" in str(getattr(rep, "nodeid", "")).replace("\\", "/") and getattr(rep, "when", "call") in (
                "call", "setup"):
                if status == "skipped" or rep.when == "call" or status == "error":
                    counts[status] += 1
    ran = counts["passed"] + counts["failed"]
    missing = comfyui_missing_reason()
    if missing:
        terminalreporter.write_line(f"ComfyUI tests: 0 ran, all skipped: {missing}")
        return
    terminalreporter.write_line(
        f"ComfyUI tests: {ran} ran ({counts['passed']} passed, {counts['failed']} failed), "
        f"{counts['skipped']} skipped, {counts['error']} errors"
    )
