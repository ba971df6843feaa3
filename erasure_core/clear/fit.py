"""Fitting CLEAR on any text-encoder adapter: data, one search per target, the modules.

Data (METHODS.md, CLEAR step 1): for each target, the forget prompts of its pairs
(plus user prompts and paraphrases that mention it, or all of them when there is one
target) are the *positives*; the aligned anchor prompts of the same templates are
the *paired negatives*; the retain prompts and ``config.background`` everyday captions
(``background.py``) are extra negatives used only for the fine-tune and the final
masks. Every real (non-pad) token of a prompt counts, so positives and paired
negatives differ exactly by what the concept changes (its own tokens and, through
attention, the others). One ``ClearModule`` is fitted per target (METHODS.md,
multi-concept); modules stack at their own blocks.

The capture runs in whatever grad mode the caller is in (ComfyUI: inference mode);
the optimisation runs under ``torch.inference_mode(False)`` + ``enable_grad`` on fresh
copies of the captured hidden states.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..adapters.base import TextEncoderAdapter
from ..errors import FitError
from ..metrics import ConditioningReport, conditioning_report
from ..patch_file import ClearModule, ErasurePatch
from ..progress import ProgressFn, noop_progress
from ..prompts import ConceptRequest, PromptSets, build_prompt_sets
from .background import background_prompts
from .search import NEGATIVE, POSITIVE, RETAIN, ClearConfig, LayerData, SearchResult, search_layer

log = logging.getLogger(__name__)

_ENCODE_CHUNK = 16


@dataclass(frozen=True)
class ClearTargetFit:
    """The fit of one target: its module and what the search saw.

    ``layer_probs``: ``(S, L)`` softmax(log alpha) at ``steps``; ``separability`` and
    ``probe_auc``: ``(L,)`` per candidate block; ``scales``: ``(L,)`` normalisation scales.
    """

    concept: str
    module: ClearModule
    blocks: tuple[int, ...]
    steps: tuple[int, ...]
    layer_probs: torch.Tensor
    tau: tuple[float, ...]
    separability: torch.Tensor
    probe_auc: torch.Tensor
    scales: torch.Tensor
    num_specific: int
    num_shared: int
    num_positive_tokens: int
    num_negative_tokens: int

    def summary(self) -> dict:
        """JSON-friendly numbers for ``ErasurePatch.metrics``."""
        return {
            "concept": self.concept,
            "block": self.module.block,
            "blocks": list(self.blocks),
            "layer_probability": round(float(self.layer_probs[-1][self.blocks.index(self.module.block)]), 4),
            "final_layer_probs": [round(float(p), 4) for p in self.layer_probs[-1]],
            "separability": [round(float(s), 4) for s in self.separability],
            "probe_auc": [round(float(s), 4) for s in self.probe_auc],
            "layer_scales": [float(s) for s in self.scales],
            "specific_features": self.num_specific,
            "shared_features": self.num_shared,
            "positive_tokens": self.num_positive_tokens,
            "negative_tokens": self.num_negative_tokens,
        }


@dataclass(frozen=True)
class ClearFit:
    """Everything a CLEAR fit produced: one module per target, and their diagnostics."""

    targets: tuple[ClearTargetFit, ...]
    config: ClearConfig
    sets: PromptSets

    @property
    def modules(self) -> tuple[ClearModule, ...]:
        return tuple(t.module for t in self.targets)


def _block_path_fn(adapter: TextEncoderAdapter) -> Callable[[int], str]:
    """Where a module hooks: ``adapter.block_path(i)`` (ComfyUI, prefixed) or the layout's (HF, root-relative)."""
    fn = getattr(adapter, "block_path", None)
    return fn if callable(fn) else adapter.layout.block_path


def _positives_of(target: str, sets: PromptSets, n_targets: int) -> list[str]:
    own = [p.target_prompt for p in sets.pairs if p.concept == target]
    extra = [s for s in sets.extra_forget if n_targets == 1 or target.lower() in s.lower()]
    return own + extra


def _encode_all(
    adapter: TextEncoderAdapter, prompts: list[str], blocks: Sequence[int], tick: Callable[[int], None]
) -> dict[str, dict[int, torch.Tensor]]:
    out: dict[str, dict[int, torch.Tensor]] = {}
    for i in range(0, len(prompts), _ENCODE_CHUNK):
        chunk = prompts[i : i + _ENCODE_CHUNK]
        for text, enc in zip(chunk, adapter.encode(chunk, blocks)):
            out[text] = enc.hidden
        tick(len(chunk))
    return out


def _layer_data(
    hidden: dict[str, dict[int, torch.Tensor]],
    groups: Sequence[tuple[list[str], int]],
    blocks: tuple[int, ...],
) -> LayerData:
    per_block: list[list[torch.Tensor]] = [[] for _ in blocks]
    roles: list[torch.Tensor] = []
    for prompts, role in groups:
        for text in prompts:
            h = hidden[text]
            for j, b in enumerate(blocks):
                per_block[j].append(h[b].float())
            roles.append(torch.full((h[blocks[0]].shape[0],), role, dtype=torch.long))
    return LayerData.from_hidden([torch.cat(h) for h in per_block], torch.cat(roles), blocks)


def _module(
    adapter: TextEncoderAdapter, result: SearchResult, data: LayerData, concept: str, config: ClearConfig
) -> ClearModule:
    sae = result.sae
    block = data.blocks[result.layer]
    return ClearModule(
        encoder=adapter.name,
        block=block,
        block_path=_block_path_fn(adapter)(block),
        W_enc=sae.W_enc.detach().float().cpu().contiguous(),
        b_enc=sae.b_enc.detach().float().cpu().contiguous(),
        W_dec=sae.W_dec.detach().float().cpu().contiguous(),
        b_dec=sae.b_dec.detach().float().cpu().contiguous(),
        mask=result.masks.specific.clone(),
        scale=float(data.scales[result.layer]),
        topk=config.topk,
        default_strength=config.gamma,
        concept=concept,
    )


def fit_clear(
    adapter: TextEncoderAdapter,
    request: ConceptRequest,
    *,
    config: ClearConfig | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    device: torch.device | str | None = None,
    sets: PromptSets | None = None,
) -> ClearFit:
    """Fit one CLEAR module per target of ``request`` on ``adapter`` (see the module docstring).

    ``device``: where the search runs (default: the adapter's ``device`` if it has one, else CPU);
    ``progress(done, total)`` is called during capture and every few optimisation steps.
    """
    config = config or ClearConfig()
    progress = progress or noop_progress
    sets = sets or build_prompt_sets(request)
    blocks = tuple(config.blocks) if config.blocks is not None else tuple(range(adapter.num_blocks))
    bad = [b for b in blocks if not 0 <= b < adapter.num_blocks]
    if not blocks or bad:
        raise FitError(f"candidate blocks {list(blocks)} are not all in 0..{adapter.num_blocks - 1} of {adapter.name}")
    device = torch.device(device or getattr(adapter, "device", "cpu"))
    targets = list(request.targets)
    positives = {t: _positives_of(t, sets, len(targets)) for t in targets}
    negatives = list(dict.fromkeys(sets.anchors))
    retain = list(dict.fromkeys(list(sets.retain) + background_prompts(targets, limit=config.background)))
    prompts = list(dict.fromkeys([p for t in targets for p in positives[t]] + negatives + retain))
    steps_per_target = config.search_steps + config.finetune_steps
    total = len(prompts) + len(targets) * steps_per_target
    done = 0

    def tick(n: int = 1) -> None:
        nonlocal done
        done += n
        if n > 1 or done % 5 == 0 or done == total:
            progress(min(done, total), total)

    progress(0, total)
    hidden = _encode_all(adapter, prompts, blocks, tick)
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    fits = []
    with torch.inference_mode(False), torch.enable_grad():
        for target in targets:
            groups = [(positives[target], POSITIVE), (negatives, NEGATIVE), (retain, RETAIN)]
            data = _layer_data(hidden, groups, blocks).to(device)
            result = search_layer(data, config, generator=generator, tick=tick)
            module = _module(adapter, result, data, target, config)
            if module.mask.sum() == 0:
                log.warning(
                    "CLEAR found no feature specific to %r at block %d: the patch will change nothing. "
                    "Add prompts, lower eps_specific or raise eps_shared.",
                    target,
                    module.block,
                )
            n_pos = int((data.role == POSITIVE).sum())
            fits.append(
                ClearTargetFit(
                    concept=target,
                    module=module,
                    blocks=blocks,
                    steps=tuple(result.trace.steps),
                    layer_probs=torch.tensor(result.trace.probs),
                    tau=tuple(result.trace.tau),
                    separability=result.separability,
                    probe_auc=result.probe_auc,
                    scales=data.scales.cpu(),
                    num_specific=result.masks.num_specific,
                    num_shared=result.masks.num_shared,
                    num_positive_tokens=n_pos,
                    num_negative_tokens=int(data.role.numel()) - n_pos,
                )
            )
    progress(total, total)
    return ClearFit(tuple(fits), config, sets)


EncodeFn = Callable[[list[str]], list[torch.Tensor]]


@torch.no_grad()
def measure(before: EncodeFn, after: EncodeFn, sets: PromptSets) -> ConditioningReport:
    """Leakage of forget and held-out prompts and retain similarity, given two ``prompts -> outputs`` functions."""
    fp, fa = [p.target_prompt for p in sets.pairs], [p.anchor_prompt for p in sets.pairs]
    hp, ha = [p.target_prompt for p in sets.holdout_pairs], [p.anchor_prompt for p in sets.holdout_pairs]
    r = list(sets.retain)
    b = {k: before(v) if v else [] for k, v in {"f": fp, "fa": fa, "h": hp, "ha": ha, "r": r}.items()}
    a = {k: after(v) if v else [] for k, v in {"f": fp, "h": hp, "r": r}.items()}
    return conditioning_report(
        list(zip(a["f"], b["f"], b["fa"])), list(zip(a["h"], b["h"], b["ha"])), list(zip(a["r"], b["r"]))
    )


def fit_metrics(fit: ClearFit, report: ConditioningReport | None) -> dict:
    """``ErasurePatch.metrics`` of a CLEAR fit: the conditioning report plus per-target search numbers."""
    metrics: dict = dict(report.as_dict()) if report is not None else {}
    metrics["clear"] = [t.summary() for t in fit.targets]
    return metrics


def fingerprint_of(adapter: TextEncoderAdapter, blocks: Sequence[int]) -> dict:
    """Fingerprints of the value projection of each intervened block (detects other base weights)."""
    from ..patch_file import weight_fingerprint

    out = {}
    for b in sorted(set(blocks)):
        path = adapter.layout.v_proj_path(b)
        weight = adapter.root.get_submodule(path).weight
        out[f"{adapter.key_prefix}{path}.weight"] = weight_fingerprint(weight)
    return out


def to_patch(
    fit: ClearFit,
    adapter: TextEncoderAdapter,
    request: ConceptRequest,
    *,
    model_family: str,
    fit_config: dict,
    report: ConditioningReport | None,
) -> ErasurePatch:
    """The ``ErasurePatch`` of a CLEAR fit (modules, concept, config, fingerprints, metrics)."""
    return ErasurePatch(
        "clear",
        model_family,
        clear_modules=fit.modules,
        concept=request.to_dict(),
        fit_config=fit_config,
        fingerprint=fingerprint_of(adapter, [m.block for m in fit.modules]),
        metrics=fit_metrics(fit, report),
    )


def config_dict(config: ClearConfig) -> dict:
    """``ClearConfig`` as JSON-friendly ``fit_config``."""
    out = dict(config.__dict__)
    out["blocks"] = list(config.blocks) if config.blocks is not None else None
    return out
