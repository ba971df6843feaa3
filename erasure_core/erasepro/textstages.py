"""ErasePro's text-encoder stages: the self-attention V projections, shallow to deep (METHODS.md, ErasePro).

Stage ``b`` of ``B`` edits the value projection ``W`` (``(d, d)``) of block ``blocks[b-1]``::

    X_t: V-proj inputs of the constrained target tokens, through the encoder with stages 1..b-1 applied
    X_a: V-proj inputs of the aligned anchor tokens, through the original encoder
    X_r: V-proj inputs of retain prompts (all real tokens) and of the target prompts' tokens
         before the concept (causal encoders), through the edited encoder
    Y = (1 - alpha_b) W X_t + alpha_b W X_a,       alpha_b = b / B (linear; "quadratic": (b/B)^2)
    (W + Delta) X_t V_k = Y V_k   exactly, minimal ||Delta X_r||^2 + lam ||Delta||^2   (solver.zero_residual_delta)

``B`` counts the denoiser stage too when there is one (``extra_stages=1``), so the last
text stage then has ``alpha < 1`` and the K/V stage has ``alpha = 1``. The V bias, where
there is one, cancels in ``Y - W X_t``. Constrained tokens come from ``align_pair``:
the concept span and everything after it for a causal encoder (CLIP), all aligned
tokens for a bidirectional one (T5, BERT). ``lam`` is relative to the retain inputs'
mean eigenvalue (``kvstages.relative_lam``).

How the earlier stages are applied while capturing is a parameter (``edited``): the
headless default adds the deltas to the adapter's weights in place
(``erasure_core.apply.applied_deltas``, restored on exit); ComfyUI passes a function that
encodes through a patched clone of the CLIP instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field

import torch

from ..adapters.base import TextEncoderAdapter
from ..apply import applied_deltas
from ..capture import ActivationCapture
from ..errors import ConceptRequestError, FitError
from ..patch_file import WeightDelta, make_delta
from ..progress import ProgressFn, noop_progress
from ..prompts import ConceptRequest, PromptSets, align_pair, build_prompt_sets
from ..solver import ResidualReport, zero_residual_delta
from .kvstages import relative_lam

log = logging.getLogger(__name__)

EditedFn = Callable[[list[WeightDelta]], AbstractContextManager[TextEncoderAdapter]]
SCHEDULES = ("linear", "quadratic", "constant")


@dataclass(frozen=True)
class EraseProConfig:
    """ErasePro options. ``blocks``: text-encoder blocks to edit (``None``: all, ``()``: none);
    ``schedule``: alpha schedule over the stages; ``lam_rel``: retain regulariser (relative);
    ``tol``: singular-value cut of the constrained columns; ``max_templates``: preset
    templates used (``None``: all)."""

    blocks: tuple[int, ...] | None = None
    schedule: str = "linear"
    lam_rel: float = 1e-3
    tol: float = 1e-3
    max_templates: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise FitError(f"unknown alpha schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.lam_rel <= 0 or not 0 < self.tol < 1:
            raise FitError(f"lam_rel must be > 0 and tol in (0, 1); got {self.lam_rel} and {self.tol}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = list(self.blocks) if self.blocks is not None else None
        return d


def stage_alphas(n: int, schedule: str = "linear") -> list[float]:
    """``alpha_b`` for ``b = 1..n``: ``b/n`` (linear), ``(b/n)^2`` (quadratic) or 1 (constant)."""
    if schedule == "linear":
        return [b / n for b in range(1, n + 1)]
    if schedule == "quadratic":
        return [(b / n) ** 2 for b in range(1, n + 1)]
    if schedule == "constant":
        return [1.0] * n
    raise FitError(f"unknown alpha schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class AlignedTokens:
    """Per forget/anchor pair: constrained target rows, aligned anchor rows, free (pre-concept) target rows."""

    target_prompts: list[str]
    anchor_prompts: list[str]
    target_rows: list[torch.Tensor]
    anchor_rows: list[torch.Tensor]
    free_rows: list[torch.Tensor]
    target_ids: list[list[int]]
    anchor_ids: list[list[int]]


def aligned_tokens(tokenize: Callable[[str], list[int]], sets: PromptSets, *, causal: bool) -> AlignedTokens:
    """The constrained token rows of every pair (METHODS.md: span and after for causal, all for bidirectional)."""
    if not sets.pairs:
        raise ConceptRequestError("the request produced no forget/anchor prompt pairs; give at least one target")
    out = AlignedTokens([], [], [], [], [], [], [])
    same = 0
    for pair in sets.pairs:
        t_ids, a_ids, al = align_pair(tokenize, pair)
        start = al.span_start if causal else 0
        t_rows, a_rows = al.target_index[start:], al.anchor_index[start:]
        if [t_ids[i] for i in t_rows] == [a_ids[i] for i in a_rows]:
            same += 1
        first = int(al.target_index[al.span_start]) if causal else 0
        out.target_prompts.append(pair.target_prompt)
        out.anchor_prompts.append(pair.anchor_prompt)
        out.target_rows.append(t_rows)
        out.anchor_rows.append(a_rows)
        out.free_rows.append(torch.arange(first, dtype=torch.long))
        out.target_ids.append(t_ids)
        out.anchor_ids.append(a_ids)
    if same == len(sets.pairs):
        raise ConceptRequestError(
            "the anchor tokenizes exactly like the target, so there is nothing to move; choose a different anchor"
        )
    return out


def capture_inputs(
    adapter: TextEncoderAdapter, prompts: Sequence[str], names: Sequence[str]
) -> dict[str, list[torch.Tensor]]:
    """The inputs of modules ``names`` (root-relative) per prompt: ``{name: [(T_i, d) float32]}``, real tokens.

    Padding is on the right for every supported tokenizer, so a prompt's real rows are
    its first ``len(ids)`` rows, whether the adapter batches prompts or not.
    """
    with ActivationCapture(adapter.root, list(names), what="input", transform=lambda x: x.float()) as cap:
        encoded = adapter.encode(list(prompts))
    out: dict[str, list[torch.Tensor]] = {}
    for name in names:
        rows = [x.reshape(-1, x.shape[-2], x.shape[-1]) for x in cap.outputs[name]]
        flat = [r for x in rows for r in x]
        if len(flat) != len(prompts):
            raise FitError(f"captured {len(flat)} inputs of {name!r} for {len(prompts)} prompts; unsupported encoder")
        out[name] = [x[: len(e.ids)] for x, e in zip(flat, encoded)]
    return out


@contextmanager
def headless_edited(adapter: TextEncoderAdapter, deltas: list[WeightDelta]) -> Iterator[TextEncoderAdapter]:
    """The adapter with ``deltas`` added to its weights (restored on exit)."""
    with applied_deltas(adapter.root, deltas, key_prefix=adapter.key_prefix):
        yield adapter


@dataclass(frozen=True)
class TextStage:
    """One text stage: block, alpha, residuals, retain change ``||Delta X_r|| / ||W X_r||``, delta norm."""

    block: int
    alpha: float
    report: ResidualReport
    retain_change: float
    delta_norm: float


@dataclass
class TextStagesResult:
    """Deltas (``target="clip"``) of the text stages, per-stage numbers, the aligned tokens and prompt sets."""

    deltas: list[WeightDelta]
    stages: list[TextStage]
    tokens: AlignedTokens
    sets: PromptSets
    total_stages: int
    info: dict = field(default_factory=dict)


def _cols(rows: list[torch.Tensor], idx: list[torch.Tensor]) -> torch.Tensor:
    parts = [x[i.to(x.device)] for x, i in zip(rows, idx) if i.numel()]
    if not parts:
        return rows[0].new_zeros(rows[0].shape[-1], 0)
    return torch.cat(parts).T


def fit_text_stages(
    adapter: TextEncoderAdapter,
    request: ConceptRequest,
    *,
    config: EraseProConfig = EraseProConfig(),
    extra_stages: int = 0,
    edited: EditedFn | None = None,
    progress: ProgressFn | None = None,
    sets: PromptSets | None = None,
) -> TextStagesResult:
    """Run the text stages shallow to deep; returns the deltas (keys ``adapter.key_prefix + <v_proj>.weight``)."""
    progress = progress or noop_progress
    edited = edited or (lambda deltas: headless_edited(adapter, deltas))
    sets = sets or build_prompt_sets(request, max_templates=config.max_templates)
    layout = adapter.layout
    blocks = tuple(range(adapter.num_blocks)) if config.blocks is None else tuple(sorted(set(config.blocks)))
    bad = [b for b in blocks if not 0 <= b < adapter.num_blocks]
    if bad:
        raise FitError(f"blocks {bad} do not exist in {adapter.name} (it has {adapter.num_blocks}, 0..)")
    tokens = aligned_tokens(adapter.tokenize, sets, causal=layout.causal)
    total = len(blocks) + extra_stages
    alphas = stage_alphas(total, config.schedule) if total else []
    result = TextStagesResult([], [], tokens, sets, total)
    if not blocks:
        return result
    names = [layout.v_proj_path(b) for b in blocks]
    anchors = capture_inputs(adapter, tokens.anchor_prompts, names)
    retain_prompts = list(sets.retain)
    prompts = tokens.target_prompts + retain_prompts
    n_t = len(tokens.target_prompts)
    for b, (block, name) in enumerate(zip(blocks, names)):
        with edited(list(result.deltas)) as now:
            captured = capture_inputs(now, prompts, [name])[name]
        for x, ids in zip(captured[:n_t], tokens.target_ids):
            if x.shape[0] != len(ids):
                raise FitError(f"the encoder saw {x.shape[0]} tokens where the tokenizer gave {len(ids)}")
        X_t = _cols(captured[:n_t], tokens.target_rows)
        X_a = _cols(anchors[name], tokens.anchor_rows).to(X_t.device)
        free = [x[i.to(x.device)] for x, i in zip(captured[:n_t], tokens.free_rows)]
        retain_rows = list(captured[n_t:]) + free
        retain_rows = [r for r in retain_rows if r.shape[0]]
        X_r = torch.cat(retain_rows).T if retain_rows else None
        for label, t in (("target", X_t), ("anchor", X_a)):
            if not torch.isfinite(t).all():
                raise FitError(
                    f"the {label} activations entering block {block} contain NaN or infinite values: "
                    "the text encoder's weights are broken (NaN); reload the model"
                )
        W = adapter.root.get_submodule(name).weight.detach().float().to(X_t.device)
        alpha = alphas[b]
        Y = W @ X_t + alpha * (W @ (X_a - X_t))
        lam = relative_lam(X_r, X_t, config.lam_rel)
        delta, report = zero_residual_delta(W, X_t, Y, X_r=X_r, lam=lam, tol=config.tol)
        retain = 0.0
        if X_r is not None:
            Xr = X_r.double()
            retain = float(
                torch.linalg.norm(delta.A @ (delta.B @ Xr)) / torch.linalg.norm(W.double() @ Xr).clamp_min(1e-30)
            )
        key = f"{adapter.key_prefix}{name}.weight"
        result.deltas.append(make_delta(key, "clip", delta.A.float().cpu(), delta.B.float().cpu()))
        norm = float(torch.linalg.norm(result.deltas[-1].delta()).item())
        result.stages.append(TextStage(block, alpha, report, retain, norm))
        log.info(
            "ErasePro stage %d/%d (block %d, alpha %.3f): kept residual %.2e, retain change %.2e",
            b + 1,
            total,
            block,
            alpha,
            report.kept_residual,
            retain,
        )
        progress(b + 1, len(blocks))
    return result
