"""CLEAR: learn where (a text-encoder block) and what (SAE features) to erase (METHODS.md, CLEAR).

* ``sae``: the sparse autoencoder, firing-rate masks, the soft separability loss;
* ``search``: ``ClearConfig``, the Gumbel-Softmax layer search with alternating SAE / alpha steps;
* ``fit``: ``fit_clear(adapter, request, config=, seed=, progress=)`` -> ``ClearFit`` (one module per target);
* ``intervention``: ``ClearIntervention`` and ``intervened(adapter, modules, gamma)`` (headless hooks);
* ``report``: the picture (layer probabilities over steps, per-layer separability);
* ``cli``: ``python -m erasure_core fit --method clear``.
"""

from __future__ import annotations

from .fit import ClearFit, ClearTargetFit, fit_clear
from .intervention import ClearIntervention, apply_interventions, intervened
from .sae import SparseAutoencoder
from .search import ClearConfig

__all__ = [
    "ClearConfig",
    "ClearFit",
    "ClearIntervention",
    "ClearTargetFit",
    "SparseAutoencoder",
    "apply_interventions",
    "fit_clear",
    "intervened",
]
