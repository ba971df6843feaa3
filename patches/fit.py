"""Fitting any method from ComfyUI: the dispatcher the "Fit Concept Eraser" node calls.

Every method module ``patches.<m>`` defines ``OPTIONS`` (its main options, described
for the UI) and ``fit_<m>(model, clip, request, *, seed, progress, **options) ->
FitResult``. This module imports it lazily, builds the ``ConceptRequest`` from the
node's text inputs, maps the node's fixed widgets (steps, rank, gamma, encoder) onto
the method's own option names, parses the free-form advanced options, and runs the
fit with ComfyUI's progress bar. Cancel in ComfyUI raises
``InterruptProcessingException`` from the progress callback; it propagates, so the
node returns nothing and nothing downstream (e.g. Save) runs.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from erasure_core.errors import FitError
from erasure_core.progress import ProgressFn
from erasure_core.prompts import ConceptRequest
from erasure_core.report import FitResult

log = logging.getLogger(__name__)

#: UI method name -> module / function suffix
METHODS: dict[str, str] = {"CLEAR": "clear", "PURE": "pure", "HiRM": "hirm", "ErasePro": "erasepro"}

#: the node's fixed widgets -> candidate option names per method (first one the method accepts wins);
#: 0 in steps/rank (or "auto") means "the method's default" and passes nothing
MAIN_WIDGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "steps": {
        "clear": ("search_steps",),
        "pure": ("steps", "capture_steps", "num_steps"),
        "hirm": ("epochs",),
        "erasepro": ("steps",),
    },
    "rank": {
        "clear": (),
        "pure": ("rank", "max_rank"),
        "hirm": ("compress_rank",),
        "erasepro": (),
    },
    "gamma": {"clear": ("gamma",), "pure": (), "hirm": (), "erasepro": ()},
    "encoder": {"clear": ("encoder",), "pure": ("encoder",), "hirm": ("encoder",), "erasepro": ()},
}
_ZERO_IS_DEFAULT = {"steps", "rank"}
_NOT_OPTIONS = {"model", "clip", "request", "seed", "progress"}


def method_key(method: str) -> str:
    """``"CLEAR"`` -> ``"clear"``; raises ``FitError`` for an unknown method."""
    for ui_name, key in METHODS.items():
        if method in (ui_name, key):
            return key
    raise FitError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def method_module(method: str) -> ModuleType:
    """The ``patches.<method>`` module (imported on first use)."""
    key = method_key(method)
    try:
        return importlib.import_module(f".{key}", __package__)
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(f"patches.{key}"):
            raise FitError(f"the {method} method is not available in this version of the pack") from None
        raise


def method_options(method: str) -> dict[str, dict[str, Any]]:
    """The method's ``OPTIONS`` (``{}`` if it has none or is not installed)."""
    try:
        return dict(getattr(method_module(method), "OPTIONS", {}) or {})
    except FitError:
        return {}


def takes_any_option(method: str) -> bool:
    """Whether ``fit_<method>`` has ``**options`` (it then checks unknown names itself)."""
    fn = getattr(method_module(method), f"fit_{method_key(method)}")
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def accepted_options(method: str) -> set[str]:
    """Option names ``fit_<method>`` accepts: its ``OPTIONS`` plus its named keyword parameters."""
    key = method_key(method)
    fn = getattr(method_module(method), f"fit_{key}")
    names = set(method_options(method))
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in _NOT_OPTIONS:
            names.add(p.name)
    return names


def main_options(method: str, **widgets: Any) -> dict[str, Any]:
    """The fixed widgets' values under the method's own option names.

    ``None``, ``"auto"`` and 0 for ``steps``/``rank`` mean "the method's default" and pass nothing.
    """
    key = method_key(method)
    accepted = accepted_options(method)
    out: dict[str, Any] = {}
    for widget, value in widgets.items():
        if value is None or value == "auto" or (widget in _ZERO_IS_DEFAULT and value == 0):
            continue
        for name in MAIN_WIDGETS.get(widget, {}).get(key, ()):
            if name in accepted:
                out[name] = value
                break
        else:
            log.info("concept erasure: %s ignores the %r widget", method, widget)
    return out


def _convert(method: str, name: str, raw: Any, spec: Mapping[str, Any] | None) -> Any:
    if spec is None:
        if isinstance(raw, str):
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                return raw
        return raw
    kind = spec.get("type")
    try:
        if kind == "int":
            value: Any = int(float(raw)) if isinstance(raw, str) else int(raw)
        elif kind == "float":
            value = float(raw)
        elif kind == "bool":
            value = raw if isinstance(raw, bool) else str(raw).strip().lower() in ("1", "true", "yes", "on")
        else:
            value = str(raw)
    except (TypeError, ValueError):
        raise FitError(f"{method} option {name}: {raw!r} is not a valid {kind}") from None
    if kind == "combo" and spec.get("options") and value not in spec["options"]:
        raise FitError(f"{method} option {name}: {value!r} is not one of {', '.join(map(str, spec['options']))}")
    if kind in ("int", "float"):
        lo, hi = spec.get("min"), spec.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise FitError(f"{method} option {name}: {value} is outside [{lo}, {hi}]")
    return value


def parse_advanced(method: str, text: str) -> dict[str, Any]:
    """Advanced options from the node's text box: ``name=value`` per line (``#`` comments) or a JSON object.

    Names are checked against what ``fit_<method>`` accepts; values are converted with
    the method's ``OPTIONS`` types and ranges.
    """
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise FitError(
                f"advanced options: not valid JSON ({e.msg}); use name=value lines or a JSON object"
            ) from None
        if not isinstance(raw, dict):
            raise FitError('advanced options: the JSON must be an object like {"lam": 0.01}')
    else:
        raw = {}
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if "=" not in line:
                raise FitError(f"advanced options: {line!r} is not of the form name=value")
            name, value = (s.strip() for s in line.split("=", 1))
            raw[name] = value
    accepted, specs = accepted_options(method), method_options(method)
    unknown = sorted(set(raw) - accepted)
    if unknown and not takes_any_option(method):
        raise FitError(
            f"advanced options: {method} has no option {', '.join(unknown)}; its options are "
            f"{', '.join(sorted(accepted))}"
        )
    return {name: _convert(method, name, value, specs.get(name)) for name, value in raw.items()}


def concept_request(
    targets: str, anchor: str = "", retain: str = "", preset: str = "object", paraphrases: str = "", prompts: str = ""
) -> ConceptRequest:
    """The ``ConceptRequest`` of the node's text inputs (multiline: one entry per line; blank retain = preset's)."""
    return ConceptRequest.create(
        targets,
        anchor=anchor,
        retain=retain if (retain or "").strip() else None,
        preset=preset,
        prompts=prompts,
        paraphrases=paraphrases,
    )


def fit_concept(
    method: str,
    model: Any,
    clip: Any,
    request: ConceptRequest,
    *,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> FitResult:
    """Run ``patches.<method>.fit_<method>`` (model and clip are not modified).

    ``progress`` defaults to ComfyUI's progress bar, which raises on Cancel; the
    exception propagates unchanged.
    """
    if model is None and clip is None:
        raise FitError("connect a MODEL and/or a CLIP to the Fit Concept Eraser node")
    key = method_key(method)
    fn = getattr(method_module(method), f"fit_{key}")
    if progress is None:
        from .progress import comfy_progress

        progress = comfy_progress()
    opts = dict(options or {})
    log.info("concept erasure: fitting %s on %s with %s", method, list(request.targets), opts)
    result = fn(model, clip, request, seed=int(seed), progress=progress, **opts)
    if not isinstance(result, FitResult):
        raise FitError(f"fit_{key} returned {type(result).__name__}, expected a FitResult")
    return result
