"""PURE's prompt groups and capture order, shared by the ComfyUI fit and the headless CLI.

``prompt_groups(request)`` -> ``(retain, forget[t], anchors[t])``: the retain prompts ``P_r``,
the forget prompts ``P_f`` of each target ``t`` (user prompts and paraphrases go to the target
they name, else to the first), and the aligned anchor prompts ``P_a`` of each target (empty
without an anchor). ``capture_jobs`` orders them retain first, then target by target, so the
fitter can freeze the retain statistics and finish each target as soon as its reads are in.
"""

from __future__ import annotations

from ..errors import ConceptRequestError
from ..prompts import ConceptRequest, build_prompt_sets

__all__ = ["capture_jobs", "prompt_groups"]

#: one capture: (kind "retain" | "forget" | "anchor", target index, prompt)
Job = tuple[str, int, str]


def prompt_groups(request: ConceptRequest) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """Retain prompts, forget prompts per target, anchor prompts per target (module docstring)."""
    sets = build_prompt_sets(request)
    forget = [[p.target_prompt for p in sets.pairs if p.concept == t] for t in request.targets]
    anchors = [
        [p.anchor_prompt for p in sets.pairs if p.concept == t] if request.anchor else [] for t in request.targets
    ]
    for extra in sets.extra_forget:
        hit = [i for i, t in enumerate(request.targets) if t.lower() in extra.lower()]
        forget[hit[0] if hit else 0].append(extra)
    if not sets.retain:
        raise ConceptRequestError("PURE needs retain prompts: add retain concepts (or keep the preset's)")
    return list(sets.retain), forget, anchors


def capture_jobs(request: ConceptRequest) -> list[Job]:
    """Every capture in fitting order: all retain prompts, then per target its forget and anchor prompts."""
    retain, forget, anchors = prompt_groups(request)
    jobs: list[Job] = [("retain", 0, p) for p in retain]
    for t in range(len(request.targets)):
        jobs += [("forget", t, p) for p in forget[t]] + [("anchor", t, p) for p in anchors[t]]
    return jobs


def last_of_target(jobs: list[Job], i: int) -> bool:
    """Whether job ``i`` is the last capture of its target (the target can be finished after it)."""
    kind, t, _ = jobs[i]
    return kind != "retain" and (i + 1 == len(jobs) or jobs[i + 1][1] != t or jobs[i + 1][0] == "retain")
