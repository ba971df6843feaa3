"""HiRM: update the first text-encoder block, supervise the last (METHODS.md, HiRM).

* ``fit``: ``HirmConfig``, ``fit_hirm(adapter, request, config=, seed=, spec=)`` -> ``HirmFit``
  (block-0 weight deltas, loss curve, ``c``), ``to_patch``, ``draw_loss``; ``ForwardSpec`` is
  how an adapter is run differentiably (``HFForward`` for transformers models);
* ``cli``: ``python -m erasure_core fit --method hirm``.
"""

from __future__ import annotations

from .fit import PRESETS, ForwardSpec, HFForward, HirmConfig, HirmFit, draw_loss, fit_hirm, forward_spec, to_patch

__all__ = [
    "PRESETS",
    "ForwardSpec",
    "HFForward",
    "HirmConfig",
    "HirmFit",
    "draw_loss",
    "fit_hirm",
    "forward_spec",
    "to_patch",
]
