"""Planted-concept conditionings for the PURE tests.

Template and retain tokens live in a ``shared``-dimensional subspace of the ``d_c``-wide text
space; each target concept adds tokens with a component along its own 2 planted directions
in the complement, and mixes into the tokens after it (as a causal text encoder would).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasure_core.pure import PureFitter, SyntheticStack


@dataclass
class Planted:
    d_c: int
    common: torch.Tensor  # (d_c, shared)
    concept_dirs: list[torch.Tensor]  # per target (d_c, 2), orthonormal
    templates: list[torch.Tensor]  # (T, shared) coefficients
    g: torch.Generator

    def vector(self, concept: int) -> torch.Tensor:
        """The planted concept direction (``(d_c, 1)``, unit norm)."""
        v = self.concept_dirs[concept] @ torch.tensor([1.0, 0.5])
        return (v / v.norm())[:, None]

    def prompt(self, template: int, concept: int | None, *, slot: int = 2) -> torch.Tensor:
        """A conditioning ``(T, d_c)``: the template with a concept token (or a random retain token) at ``slot``."""
        c = self.templates[template] @ self.common.T
        if concept is None:
            token = torch.randn(self.common.shape[1], generator=self.g) @ self.common.T
        else:
            token = 3.0 * self.concept_dirs[concept] @ torch.tensor([1.0, 0.5])
        c = c.clone()
        c[slot] = token
        c[slot + 1 :] += 0.3 * token
        return c


def planted(d_c: int = 64, shared: int = 40, targets: int = 1, n_templates: int = 6, T: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d_c, d_c, generator=g))[0]
    common, special = basis[:, :shared], basis[:, shared:]
    dirs = []
    for _ in range(targets):
        D = special @ torch.randn(special.shape[1], 2, generator=g)
        dirs.append(torch.linalg.qr(D)[0])
    templates = [torch.randn(T, shared, generator=g) for _ in range(n_templates)]
    return Planted(d_c, common, dirs, templates, g)


def fit_planted(
    stack: SyntheticStack, p: Planted, *, targets: int = 1, anchor: bool = False, retain_per_template: int = 6, **kw
) -> tuple[PureFitter, object]:
    fitter = PureFitter(stack.dims, **kw)
    n = len(p.templates)
    for i in range(n * retain_per_template):
        for layer, R in stack.reads(p.prompt(i % n, None), queries=32, seed=100 + i).items():
            fitter.update(layer, R, forget=False)
    for t in range(targets):
        for i in range(n):
            for layer, R in stack.reads(p.prompt(i, t), queries=32, seed=200 + i).items():
                fitter.update(layer, R, forget=True, target=t)
            if anchor:
                for layer, R in stack.reads(p.prompt(i, None), queries=32, seed=300 + i).items():
                    fitter.update_anchor(layer, R, target=t)
    return fitter, fitter.solve()
