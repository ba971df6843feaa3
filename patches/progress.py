"""ComfyUI's progress bar and interrupt as an ``erasure_core`` progress callback."""

from __future__ import annotations

from erasure_core.progress import ProgressFn


def comfy_progress(node_id: str | None = None) -> ProgressFn:
    """``progress(done, total)`` that moves ComfyUI's bar and raises if the user pressed Cancel.

    ``throw_exception_if_processing_interrupted`` raises ComfyUI's
    ``InterruptProcessingException``; fits unwind through it and write nothing.
    """
    import comfy.model_management as mm
    import comfy.utils

    bar: list[comfy.utils.ProgressBar] = []

    def update(done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        if not bar or bar[0].total != total:
            bar[:] = [comfy.utils.ProgressBar(max(total, 1), node_id=node_id)]
        bar[0].update_absolute(done, max(total, 1))

    return update
