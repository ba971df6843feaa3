"""Progress reporting and interruption for long work, independent of the front end.

Long loops in ``erasure_core`` take a ``progress`` callback ``progress(done, total)``.
ComfyUI passes one that updates its ProgressBar and raises on interrupt (so an
interrupted fit unwinds and returns nothing); the command line passes a tqdm bar.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

ProgressFn = Callable[[int, int], None]


def noop_progress(done: int, total: int) -> None:
    """The default: report nothing."""


@contextmanager
def tqdm_progress(desc: str, *, disable: bool = False) -> Iterator[ProgressFn]:
    """A ``ProgressFn`` drawing a tqdm bar on stderr (the command line's progress)."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, disable=disable, leave=False)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()
