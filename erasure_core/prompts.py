"""Concept requests, prompt sets from preset templates, and token alignment.

A ``ConceptRequest`` (targets, anchor, retain, preset, user prompts, paraphrases) is
turned into prompt sets (METHODS.md, shared notation)::

    P_f = templates x targets (+ user prompts, + paraphrases)   forget
    P_a = the same templates x anchor                            anchor (aligned pairs)
    P_r = templates x retain concepts                            retain
    P_h = held-out templates x targets                           held-out paraphrases (eval only)

The presets (object, style, celebrity, nudity) are data: ``data/presets.json``.
``align_tokens`` is the one token-alignment function every method uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import ConceptRequestError

Preset = Literal["object", "style", "celebrity", "nudity"]
PRESETS: tuple[str, ...] = ("object", "style", "celebrity", "nudity")
_DATA = Path(__file__).with_name("data") / "presets.json"


@cache
def preset_data() -> dict[str, dict[str, Any]]:
    """The preset table from ``data/presets.json`` (templates, retain concepts, keywords)."""
    with open(_DATA, encoding="utf-8") as f:
        return json.load(f)


def _clean(items: Sequence[str] | str | None) -> list[str]:
    if items is None:
        return []
    if isinstance(items, str):
        items = items.splitlines()
    out, seen = [], set()
    for s in items:
        s = " ".join(str(s).split())
        if s and s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)
    return out


@dataclass(frozen=True)
class ConceptRequest:
    """What to erase and what to keep.

    ``targets``: one or more concepts ("Van Gogh"); ``anchor``: what they should become
    ("" = nothing); ``retain``: concepts that must not move (defaults to the preset's);
    ``prompts``: extra user prompts that contain a target; ``paraphrases``: prompts that
    evoke a target without naming it (forget set only, no aligned anchor).
    Multiline strings are split into lines; blanks and duplicates are dropped.
    """

    targets: tuple[str, ...]
    anchor: str = ""
    retain: tuple[str, ...] = ()
    preset: str = "object"
    prompts: tuple[str, ...] = ()
    paraphrases: tuple[str, ...] = ()

    @classmethod
    def create(
        cls,
        targets: Sequence[str] | str,
        *,
        anchor: str = "",
        retain: Sequence[str] | str | None = None,
        preset: str = "object",
        prompts: Sequence[str] | str | None = None,
        paraphrases: Sequence[str] | str | None = None,
    ) -> ConceptRequest:
        """Validate and normalise a request; raises ``ConceptRequestError`` with what to fix."""
        if preset not in PRESETS:
            raise ConceptRequestError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        t = _clean(targets)
        if preset == "nudity" and not t:
            t = list(preset_data()["nudity"]["keywords"])
        if not t:
            raise ConceptRequestError("no target concept given: enter at least one concept to erase (one per line)")
        a = " ".join(str(anchor or "").split())
        if preset == "nudity" and not a:
            a = preset_data()["nudity"]["anchor"]
        for x in t:
            if a and x.lower() == a.lower():
                raise ConceptRequestError(
                    f"the anchor {a!r} equals the target {x!r}: the anchor is what the target should become; "
                    "choose a different anchor (or leave it empty to map the concept to nothing)"
                )
        r = _clean(retain) if retain is not None and _clean(retain) else list(preset_data()[preset]["retain"])
        lowered = {x.lower() for x in t}
        r = [x for x in r if x.lower() not in lowered and x.lower() != a.lower()]
        return cls(tuple(t), a, tuple(r), preset, tuple(_clean(prompts)), tuple(_clean(paraphrases)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "anchor": self.anchor,
            "retain": list(self.retain),
            "preset": self.preset,
            "prompts": list(self.prompts),
            "paraphrases": list(self.paraphrases),
        }


@dataclass(frozen=True)
class PromptPair:
    """A forget prompt and its aligned anchor prompt built from one template.

    ``prefix``/``suffix`` are the template's text around the concept slot; the
    concept's tokens are found from them by ``concept_span``.
    """

    target_prompt: str
    anchor_prompt: str
    concept: str
    anchor: str
    prefix: str
    suffix: str


@dataclass(frozen=True)
class PromptSets:
    """The prompt sets of a request (see the module docstring)."""

    pairs: tuple[PromptPair, ...]
    extra_forget: tuple[str, ...]
    retain: tuple[str, ...]
    holdout_pairs: tuple[PromptPair, ...]
    request: ConceptRequest = field(repr=False)

    @property
    def holdout(self) -> list[str]:
        """Held-out forget prompts (templates never used for fitting)."""
        return [p.target_prompt for p in self.holdout_pairs]

    @property
    def forget(self) -> list[str]:
        return [p.target_prompt for p in self.pairs] + list(self.extra_forget)

    @property
    def anchors(self) -> list[str]:
        return [p.anchor_prompt for p in self.pairs]


def _fill(template: str, concept: str) -> tuple[str, str, str]:
    prefix, _, suffix = template.partition("{}")
    text = prefix + concept + suffix
    return " ".join(text.split()), prefix, suffix


def build_prompt_sets(request: ConceptRequest, *, max_templates: int | None = None) -> PromptSets:
    """Forget/anchor pairs, extra forget prompts, retain prompts and held-out prompts of ``request``."""
    data = preset_data()[request.preset]
    templates = list(data["templates"])[:max_templates]

    def pairs_of(tpls: list[str]) -> tuple[PromptPair, ...]:
        out = []
        for concept in request.targets:
            for tpl in tpls:
                text, prefix, suffix = _fill(tpl, concept)
                anchor_text, _, _ = _fill(tpl, request.anchor)
                out.append(PromptPair(text, anchor_text, concept, request.anchor, prefix, suffix))
        return tuple(out)

    retain = [_fill(tpl, r)[0] for r in request.retain for tpl in templates[: max(2, len(templates) // 3)]]
    extra = list(request.prompts) + list(request.paraphrases)
    return PromptSets(
        pairs_of(templates), tuple(extra), tuple(retain), pairs_of(list(data.get("holdout_templates", []))), request
    )


# --------------------------------------------------------------------------- tokens
def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def concept_span(
    tokenize: Callable[[str], list[int]], pair_prefix: str, concept: str, pair_suffix: str
) -> tuple[list[int], int, int]:
    """Token ids of ``prefix + concept + suffix`` and the concept's token span ``[start, end)``.

    ``tokenize`` returns the real (non-pad) token ids of a text, special tokens included.
    The span is found by comparing with the tokenization of the text without the
    concept: common prefix and common suffix are outside the span. Works for any
    tokenizer (BPE merges across the boundary are absorbed into the span).
    """
    full_text = " ".join((pair_prefix + concept + pair_suffix).split())
    bare_text = " ".join((pair_prefix + pair_suffix).split())
    full, bare = tokenize(full_text), tokenize(bare_text)
    if full == bare:
        # The concept tokenizes to nothing (the empty anchor): an empty span at the concept's
        # slot, i.e. after the prefix's tokens and before the end-of-text tokens (EOS, [SEP])
        # every text ends with. Without this the common prefix runs to the end of the text and
        # the span lands after EOS, so nothing after the span would line up in ``align_tokens``.
        n_end = _common_prefix(tokenize("")[::-1], bare[::-1])
        slot = min(_common_prefix(tokenize(" ".join(pair_prefix.split())), bare), max(len(bare) - n_end, 0))
        return full, slot, slot
    p = _common_prefix(full, bare)
    s = _common_prefix(full[::-1], bare[::-1])
    s = min(s, len(full) - p, len(bare) - p)
    return full, p, len(full) - s


@dataclass(frozen=True)
class TokenAlignment:
    """Row indices that line up a target prompt with its anchor prompt.

    ``target_index[i]`` and ``anchor_index[i]`` are corresponding token positions;
    rows ``span_start`` onwards are the concept span and every token after it.
    """

    target_index: torch.Tensor
    anchor_index: torch.Tensor
    span_start: int

    def __len__(self) -> int:
        return int(self.target_index.numel())


def align_tokens(
    target_len: int, target_span: tuple[int, int], anchor_len: int, anchor_span: tuple[int, int]
) -> TokenAlignment:
    """Align the tokens of a target prompt and its anchor prompt (METHODS.md).

    Same template, the concept's span replaced by the anchor's span. Tokens before the
    spans pair one to one; inside the spans the shorter one is padded by repeating its
    last token (an empty span repeats the token just before it); after the spans,
    positions pair from the end of each span until the shorter prompt ends.
    """
    (ts, te), (as_, ae) = target_span, anchor_span
    if not (0 <= ts <= te <= target_len and 0 <= as_ <= ae <= anchor_len):
        raise ValueError(f"bad spans {target_span} / {anchor_span} for lengths {target_len} / {anchor_len}")
    pre = min(ts, as_)
    t_idx = list(range(pre))
    a_idx = list(range(pre))
    span_start = len(t_idx)
    n = max(te - ts, ae - as_, 1)
    for i in range(n):
        t_idx.append(min(ts + i, te - 1) if te > ts else max(ts - 1, 0))
        a_idx.append(min(as_ + i, ae - 1) if ae > as_ else max(as_ - 1, 0))
    for j in range(min(target_len - te, anchor_len - ae)):
        t_idx.append(te + j)
        a_idx.append(ae + j)
    return TokenAlignment(torch.tensor(t_idx, dtype=torch.long), torch.tensor(a_idx, dtype=torch.long), span_start)


def align_pair(tokenize: Callable[[str], list[int]], pair: PromptPair) -> tuple[list[int], list[int], TokenAlignment]:
    """Tokenize a ``PromptPair`` and align it: ``(target_ids, anchor_ids, alignment)``."""
    t_ids, ts, te = concept_span(tokenize, pair.prefix, pair.concept, pair.suffix)
    a_ids, as_, ae = concept_span(tokenize, pair.prefix, pair.anchor, pair.suffix)
    if te <= ts:
        raise ConceptRequestError(
            f"the target {pair.concept!r} tokenizes to nothing in {pair.target_prompt!r}; "
            "use a word the text encoder knows"
        )
    return t_ids, a_ids, align_tokens(len(t_ids), (ts, te), len(a_ids), (as_, ae))
