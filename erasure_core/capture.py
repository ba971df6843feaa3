"""Activation capture on plain ``nn.Module`` s with forward hooks.

Hooks are added in a context manager and always removed in ``finally``. What is
stored is *cloned* (CLIP and T5 blocks add to the previous block's output in place,
so a stored reference would be overwritten). Capture can stop the forward pass as
soon as the last wanted module has run (``stop_early=True`` and ``run(fn)``).

Example::

    with ActivationCapture(encoder, ["encoder.layer.2", "encoder.layer.4"], stop_early=True) as cap:
        cap.run(lambda: encoder(**batch))
    h2 = cap.outputs["encoder.layer.2"][0]     # (B, T, d)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["ActivationCapture", "first_tensor"]


class _StopForward(Exception):
    """Raised by the hook of the last wanted module to end the forward pass early."""


def first_tensor(value: Any) -> torch.Tensor:
    """The hidden state in a module's output or input (``x`` or ``(x, extra...)``)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find a tensor in a module output of type {type(value).__name__}")


class ActivationCapture:
    """Records (clones of) the outputs or inputs of named submodules of ``root``.

    ``outputs[name]`` is a list with one tensor per call of that module. ``transform``
    (``tensor -> tensor``) is applied before storing, e.g. to move to the CPU, cast to
    float32 or select rows; the stored tensor is always a fresh copy.
    """

    def __init__(
        self,
        root: nn.Module,
        names: Sequence[str],
        *,
        what: Literal["output", "input"] = "output",
        stop_early: bool = False,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not names:
            raise ValueError("ActivationCapture needs at least one module name")
        self.root = root
        self.names = list(names)
        self.what = what
        self.stop_early = stop_early
        self.transform = transform
        self.outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: set[str] = set()

    def _store(self, name: str, value: Any) -> None:
        x = first_tensor(value).detach()
        y = self.transform(x) if self.transform is not None else x
        # clone whenever y shares memory with the module's tensor (itself, or a view such as a row
        # slice, whose data_ptr differs): a later in-place ``x += f(x)`` would overwrite it
        shared = y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        self.outputs[name].append(y.clone() if shared else y)
        self._pending.discard(name)
        if self.stop_early and not self._pending:
            raise _StopForward

    def __enter__(self) -> ActivationCapture:
        try:
            for name in self.names:
                module = self.root.get_submodule(name)
                if self.what == "output":
                    hook = module.register_forward_hook(lambda m, i, o, n=name: self._store(n, o))
                else:
                    hook = module.register_forward_pre_hook(lambda m, i, n=name: self._store(n, i))
                self._handles.append(hook)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def run(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` (a forward pass); returns its result, or ``None`` if capture stopped it early."""
        self._pending = set(self.names)
        try:
            return fn()
        except _StopForward:
            return None
