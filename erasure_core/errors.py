"""Error types of the erasure library.

Every error is a ``ValueError`` subclass whose message says what was received,
what was expected and what to do, so that ComfyUI can show it to the user as is.
"""

from __future__ import annotations


class ErasureError(ValueError):
    """Base class of every error raised on bad user input or bad files."""


class ConceptRequestError(ErasureError):
    """The concept request (targets, anchor, retain, preset) is not usable."""


class PatchFileError(ErasureError):
    """A patch file is malformed, truncated, of an unknown version, or unsafe."""


class PatchMismatchError(ErasureError):
    """A patch does not fit the model it is applied to (family or shapes)."""


class FitError(ErasureError):
    """A fit cannot proceed or produced non-finite numbers."""
