"""Concept erasure for diffusion models: the standalone torch library.

This package never imports ComfyUI. It holds the four methods (CLEAR, PURE,
HiRM, ErasePro), the shared closed-form solver, activation capture on plain
``nn.Module`` s, prompt sets, metrics, and the ``ErasurePatch`` file format.
Submodules are imported lazily by their users; importing this package is cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
