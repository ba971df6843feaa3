"""One spec per model family: detection, cross-attention K/V weights, text encoders.

Per-family facts are data here, not if/elif chains elsewhere (ARCHITECTURE.md).
Keys are ModelPatcher state-dict keys (``diffusion_model.<path>``), verified on tiny
and meta-device full-size builds (COMFYUI.md §4).

Family names (stored in patch files): ``sd15``, ``sdxl``, ``flux``, ``wan21`` (Wan2.1
1.3B/14B and each of Wan2.2 A14B's two experts, which share that architecture) and
``wan22_5b`` (Wan2.2 TI2V-5B).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from erasure_core.errors import PatchMismatchError


@dataclass(frozen=True)
class KVTarget:
    """One K or V weight a closed-form edit may change.

    ``layer``: the attention module path inside the diffusion model
    (``input_blocks.1.1.transformer_blocks.0.attn2``); ``which``: ``"k"`` or ``"v"``;
    ``key``: the ModelPatcher key of the weight; ``offset``: ``(dim, start, length)``
    for a row slice of a fused weight (Flux), else ``None``; ``lora_name``: the base
    name under which ComfyUI's LoRA loader maps a file tensor to this key (slice).
    """

    layer: str
    which: Literal["k", "v"]
    key: str
    offset: tuple[int, int, int] | None = None
    lora_name: str | None = None


@dataclass(frozen=True)
class FamilySpec:
    """Facts about one model family.

    ``model_classes``: names of ``comfy.model_base`` classes that identify it (checked
    along the MRO, most specific first, so no internal class is imported);
    ``kv_pattern``: regex over state-dict keys whose group 1 is the attention layer;
    ``capture``: how the text the denoiser reads reaches K/V (``"attn2"``: the TE
    output, same for every layer and step; ``"wan_text_embedding"``: ``text_embedding(c)``,
    same for every block and step; ``"flux_txt"``: per-block, per-step text stream);
    ``encoders``: the CLIP encoders this family's text conditioning comes from.
    """

    name: str
    display: str
    model_classes: tuple[str, ...]
    kv_pattern: str
    capture: Literal["attn2", "wan_text_embedding", "flux_txt"]
    encoders: tuple[str, ...]
    kv_targets_fn: Callable[[FamilySpec, dict[str, Any], Any], list[KVTarget]] | None = None

    def kv_targets(self, state_keys: dict[str, Any], model: Any = None) -> list[KVTarget]:
        """The K/V targets of a model with the given ``{key: shape}`` state dict."""
        if self.kv_targets_fn is not None:
            return self.kv_targets_fn(self, state_keys, model)
        rx = re.compile(self.kv_pattern)
        out = []
        for key in state_keys:
            m = rx.match(key)
            if m:
                out.append(KVTarget(m.group(1), m.group(2), key))
        return sorted(out, key=lambda t: (_natural(t.layer), t.which))


def _natural(s: str) -> list[Any]:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)]


def _flux_targets(spec: FamilySpec, state_keys: dict[str, Any], model: Any) -> list[KVTarget]:
    """Flux: K and V row slices of ``double_blocks.{i}.txt_attn.qkv`` (single blocks are never edited)."""
    rx = re.compile(spec.kv_pattern)
    out = []
    for key, shape in state_keys.items():
        m = rx.match(key)
        if not m:
            continue
        hidden = int(shape[1])
        block = re.search(r"double_blocks\.(\d+)\.", key).group(1)
        for which, start in (("k", hidden), ("v", 2 * hidden)):
            name = f"transformer.transformer_blocks.{block}.attn.add_{which}_proj"
            out.append(KVTarget(m.group(1), which, key, (0, start, hidden), name))
    return sorted(out, key=lambda t: (_natural(t.layer), t.which))


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            "sd15",
            "Stable Diffusion 1.5",
            ("SD15",),
            r"^diffusion_model\.(.+\.attn2)\.to_([kv])\.weight$",
            "attn2",
            ("clip_l",),
        ),
        FamilySpec(
            "sdxl",
            "Stable Diffusion XL",
            ("SDXL",),
            r"^diffusion_model\.(.+\.attn2)\.to_([kv])\.weight$",
            "attn2",
            ("clip_l", "clip_g"),
        ),
        FamilySpec(
            "flux",
            "Flux.1",
            ("Flux",),
            r"^diffusion_model\.(double_blocks\.\d+\.txt_attn)\.qkv\.weight$",
            "flux_txt",
            ("t5xxl", "clip_l"),
            _flux_targets,
        ),
        FamilySpec(
            "wan22_5b",
            "Wan2.2 TI2V-5B",
            ("WAN22",),
            r"^diffusion_model\.(blocks\.\d+\.cross_attn)\.([kv])\.weight$",
            "wan_text_embedding",
            ("umt5xxl",),
        ),
        FamilySpec(
            "wan21",
            "Wan2.1 / Wan2.2 A14B",
            ("WAN21",),
            r"^diffusion_model\.(blocks\.\d+\.cross_attn)\.([kv])\.weight$",
            "wan_text_embedding",
            ("umt5xxl",),
        ),
    )
}

_CONFIG_NAMES = {"SD15": "sd15", "SDXL": "sdxl"}


def detect_family(model: Any) -> FamilySpec:
    """The spec of a MODEL (ModelPatcher); raises ``PatchMismatchError`` for unsupported models."""
    base = getattr(model, "model", model)
    config_name = type(getattr(base, "model_config", None)).__name__
    if config_name in _CONFIG_NAMES:
        return FAMILIES[_CONFIG_NAMES[config_name]]
    mro = [c.__name__ for c in type(base).__mro__]
    for cls_name in mro:
        for spec in FAMILIES.values():
            if cls_name in spec.model_classes and spec.name not in ("sd15", "sdxl"):
                return spec
    raise PatchMismatchError(
        f"unsupported model {type(base).__name__} (config {config_name}): the pack supports "
        + ", ".join(s.display for s in FAMILIES.values())
        + ". Load one of those with a checkpoint or diffusion-model loader."
    )


def model_state_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a ModelPatcher's weights (no copies made)."""
    return {k: tuple(v.shape) for k, v in model.model.state_dict(keep_vars=True).items()}


def family_display(name: str) -> str:
    spec = FAMILIES.get(name)
    return spec.display if spec else name
