"""Shared pieces of the demo: its settings (full and quick), one table row, writing a patch file."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..metrics import ConditioningReport
from ..patch_file import ErasurePatch

log = logging.getLogger(__name__)

#: the embedded default concept request of the demo (one for every method)
TARGET = "Van Gogh"
ANCHOR = "a painting"
PRESET = "style"
SEED = 0


@dataclass(frozen=True)
class DemoSettings:
    """Step counts of the demo. ``None`` keeps a method's own default.

    ``clear_*``: CLEAR's layer-search and fine-tune steps and background captions;
    ``hirm_epochs``: HiRM epochs (``None``: the preset's); ``queries``: random image queries
    per layer and prompt whose reads PURE collects; ``read_seeds``: query draws per prompt.
    """

    clear_search_steps: int | None = None
    clear_finetune_steps: int | None = None
    clear_background: int | None = None
    hirm_epochs: int | None = None
    queries: int = 64
    read_seeds: int = 2

    @classmethod
    def full(cls) -> DemoSettings:
        return cls()

    @classmethod
    def quick(cls) -> DemoSettings:
        """Few steps: the same pipeline in a few seconds per method (smoke tests; weaker numbers)."""
        return cls(
            clear_search_steps=40,
            clear_finetune_steps=20,
            clear_background=16,
            hirm_epochs=10,
            queries=16,
            read_seeds=1,
        )


@dataclass
class DemoRow:
    """One line of the before/after table.

    Leakage: 1 = unchanged, 0 = became the anchor (``metrics.leakage``); ``retain_cos``:
    mean cosine of retain outputs to their originals; ``cos_anchor``: mean cosine of the
    (edited) forget outputs to their anchors; ``notes``: the method's own numbers.
    """

    method: str
    measured_on: str
    forget_leakage: float
    holdout_leakage: float
    retain_cos: float
    cos_anchor: float
    notes: str = ""
    path: Path | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_report(
        cls, method: str, measured_on: str, report: ConditioningReport, notes: str, path: Path | None, seconds: float
    ) -> DemoRow:
        """A row from a ``metrics.ConditioningReport``."""
        return cls(
            method,
            measured_on,
            report.forget_leakage,
            report.holdout_leakage,
            report.retain_cos,
            report.forget_cos_anchor,
            notes,
            path,
            seconds,
            report.as_dict(),
        )

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path is not None and self.path.exists() else 0


def save_patch(patch: ErasurePatch, out_dir: Path, name: str) -> Path:
    """Write ``patch`` to ``out_dir/name`` (the demo's own files are replaced on a rerun)."""
    path = out_dir / name
    if path.exists():
        log.info("replacing the demo's earlier %s", path)
    return patch.save(path, overwrite=True)


@contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    out = [0.0]
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out[0] = time.perf_counter() - t0
