"""PURE on ComfyUI MODELs: the fit the "Fit Concept Eraser" node calls, and the apply.

``fit_pure(model, clip, request, ...)`` encodes the prompt sets with the user's CLIP, samples
a short trajectory (``steps`` steps, ``seeds`` seeds, ``resolution`` px, ``frames`` latent
frames for video) for every retain, forget and anchor prompt on a clone of ``model`` with
``ReadCapture`` attached, streams the read vectors into a ``PureFitter`` (retain first, then
each target, finished one by one), solves, and returns the K/V deltas ``-(W Q) Q^T`` as an
``ErasurePatch`` (Flux: the K/V row slices of ``double_blocks.*.txt_attn.qkv``). Neither
``model`` nor ``clip`` is modified. ``apply_pure(model, patch, strength)`` adds the deltas
to a clone (``patches.apply.apply_weight_patch``).

Wan2.2 A14B is two MODELs of the ``wan21`` architecture, the high-noise and the low-noise
expert, with different weights. Fit once per expert (same CLIP, same request): each patch's
deltas ``-(W Q) Q^T`` are built from that expert's own ``W`` and its own captured reads, and
its fingerprint records that expert's weights. In a workflow, put one "PURE Project K/V"
node after each expert's loader with that expert's patch. Applied to the other expert a
patch still loads (same keys and shapes), but ``apply`` logs a warning that the base
weights differ from the ones it was fitted on, and the projection is not exact there.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from erasure_core.errors import ErasureError, PatchMismatchError
from erasure_core.patch_file import ErasurePatch, make_delta, weight_fingerprint
from erasure_core.progress import ProgressFn, noop_progress
from erasure_core.prompts import ConceptRequest
from erasure_core.pure import PureEraser, PureFitter
from erasure_core.pure.jobs import capture_jobs, last_of_target
from erasure_core.report import FitResult, figure_to_image, format_metrics, new_figure

from .apply import apply_weight_patch
from .families import FamilySpec, KVTarget, detect_family, model_state_shapes
from .pure_capture import ReadCapture

log = logging.getLogger(__name__)

OPTIONS: dict[str, dict[str, Any]] = {
    "steps": {"type": "int", "default": 4, "min": 1, "max": 50, "tooltip": "Sampling steps captured per prompt."},
    "seeds": {"type": "int", "default": 2, "min": 1, "max": 16, "tooltip": "Noise seeds per prompt."},
    "rank": {"type": "int", "default": 8, "min": 1, "max": 64, "tooltip": "Directions removed per target and layer."},
    "threshold": {
        "type": "float",
        "default": 10.0,
        "min": 1.0,
        "max": 1e6,
        "tooltip": "Keep a direction only if forget prompts read it this many times more than retain prompts.",
    },
    "resolution": {
        "type": "int",
        "default": 256,
        "min": 64,
        "max": 2048,
        "tooltip": "Image size (px) of the short capture trajectory.",
    },
    "frames": {"type": "int", "default": 1, "min": 1, "max": 5, "tooltip": "Latent frames (video models)."},
    "cfg": {"type": "float", "default": 4.0, "min": 1.0, "max": 30.0, "tooltip": "CFG of the capture trajectory."},
    "q_max": {"type": "int", "default": 256, "min": 16, "max": 4096, "tooltip": "Image queries sampled per layer."},
}

#: conditioning extras per family (the rest needs only the cross-attention tensor)
_COND_EXTRA = {"flux": {"guidance": 3.5}}
#: pixel -> latent downscale per family
_DOWNSCALE = {"wan22_5b": 16}


def _encode(clip: Any, text: str, family: str, size: int) -> list:
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    extra = dict(out, **_COND_EXTRA.get(family, {}))
    if family == "sdxl":
        extra.update(width=size, height=size, crop_w=0, crop_h=0, target_width=size, target_height=size)
    return [[cond, extra]]


def _latent(model: Any, family: str, resolution: int, frames: int) -> torch.Tensor:
    fmt = model.get_model_object("latent_format")
    side = max(1, resolution // _DOWNSCALE.get(family, 8))
    if getattr(fmt, "latent_dimensions", 2) == 3:
        return torch.zeros(1, fmt.latent_channels, frames, side, side)
    return torch.zeros(1, fmt.latent_channels, side, side)


def _base_weight(model: Any, t: KVTarget) -> torch.Tensor:
    W = model.get_key_patches(t.key)[t.key][0][0]
    if t.offset is not None:
        dim, start, length = t.offset
        W = W.narrow(dim, start, length)
    return W.detach().float()


def _targets(model: Any, spec: FamilySpec) -> list[KVTarget]:
    targets = spec.kv_targets(model_state_shapes(model), model)
    if not targets:
        raise PatchMismatchError(f"found no cross-attention K/V weights in this {spec.display} MODEL")
    return targets


def fit_pure(
    model: Any,
    clip: Any,
    request: ConceptRequest,
    *,
    seed: int = 0,
    progress: ProgressFn | None = None,
    steps: int = 4,
    seeds: int = 2,
    rank: int = 8,
    threshold: float = 10.0,
    resolution: int = 256,
    frames: int = 1,
    cfg: float = 4.0,
    q_max: int = 256,
    sampler_name: str = "euler",
    scheduler: str = "simple",
) -> FitResult:
    """Fit PURE on ``model`` (read with ``clip``'s conditioning); see the module docstring."""
    import comfy.sample

    if model is None or clip is None:
        raise ErasureError("PURE needs both the MODEL and the CLIP it is used with: connect both to the fit node")
    spec = detect_family(model)
    progress = progress or noop_progress
    targets = _targets(model, spec)
    shapes = model_state_shapes(model)
    dims = {t.layer: int(shapes[t.key][1]) for t in targets}
    jobs = capture_jobs(request)
    config = dict(steps=steps, seeds=seeds, rank=rank, threshold=threshold, resolution=resolution, frames=frames)
    config.update(cfg=cfg, q_max=q_max, sampler_name=sampler_name, scheduler=scheduler, seed=seed)

    fitter = PureFitter(dims, rank=rank, threshold=threshold, seed=seed)
    mode: dict[str, Any] = {}

    def sink(layer: str, R: torch.Tensor) -> None:
        if mode["kind"] == "anchor":
            fitter.update_anchor(layer, R, target=mode["target"])
        else:
            fitter.update(layer, R, forget=mode["kind"] == "forget", target=mode["target"])

    clone = model.clone()
    ReadCapture(spec, list(dims), sink, q_max=q_max, seed=seed).attach(clone)
    latent = _latent(model, spec.name, resolution, frames)
    negative = _encode(clip, "", spec.name, resolution)
    total = len(jobs) * seeds * steps
    done = 0
    progress(0, total)
    try:
        for i, (kind, t, prompt) in enumerate(jobs):
            mode.update(kind=kind, target=t)
            positive = _encode(clip, prompt, spec.name, resolution)
            for s in range(seeds):
                noise = comfy.sample.prepare_noise(latent, seed + s)
                base = done

                def callback(step: int, *_: Any, base: int = base) -> None:
                    progress(min(base + step + 1, total), total)

                comfy.sample.sample(
                    clone, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                    seed=seed + s, callback=callback, disable_pbar=True,
                )  # fmt: skip
                done += steps
                progress(done, total)
            if last_of_target(jobs, i) and t in fitter.forget:
                fitter.finish_target(t)
    finally:  # an interrupt (raised by progress) leaves nothing behind, not even on the discarded clone
        ReadCapture.detach(clone)
    eraser = fitter.solve()
    patch, per_layer = _to_patch(model, spec, targets, eraser, fitter, request, config)
    image = _draw(per_layer, f"PURE on {spec.display}")
    summary = (
        f"PURE on {spec.display}: {len(dims)} layers, rank {patch.metrics['rank_min']}-{patch.metrics['rank_max']}. "
        + format_metrics(patch.metrics)
    )
    return FitResult(patch, image, summary, {"eraser": eraser})


def _to_patch(
    model: Any,
    spec: FamilySpec,
    targets: list[KVTarget],
    eraser: PureEraser,
    fitter: PureFitter,
    request: ConceptRequest,
    config: dict[str, Any],
) -> tuple[ErasurePatch, dict[str, dict[str, float]]]:
    deltas, fingerprint, per_layer = [], {}, {}
    for t in targets:
        if eraser.rank(t.layer) == 0:
            continue
        W = _base_weight(model, t)
        up, down = eraser.delta(t.layer, W)
        deltas.append(make_delta(t.key, "model", up.cpu(), down.cpu(), offset=t.offset, lora_name=t.lora_name))
        fingerprint.setdefault(t.key, weight_fingerprint(model.get_key_patches(t.key)[t.key][0][0]))
        S = fitter.retain[t.layer].matrix().to(W.device)
        D = up @ down
        num = torch.trace(D @ S @ D.T).clamp_min(0)  # ~0, even slightly < 0, when retain reads miss Q
        change = float(num / torch.trace(W @ S @ W.T).clamp_min(1e-30)) ** 0.5
        entry = per_layer.setdefault(t.layer, {"energy": eraser.energy.get(t.layer, 0.0), "retain_change": 0.0})
        entry["retain_change"] = max(entry["retain_change"], change)
        entry["rank"] = eraser.rank(t.layer)
    if not deltas:
        raise ErasureError(
            "PURE found no direction that forget prompts read much more than retain prompts; lower the "
            "threshold, add forget prompts, or check that the targets are words the text encoder knows"
        )
    ranks = [eraser.rank(layer) for layer in eraser.layers]
    changes = [v["retain_change"] for v in per_layer.values()]
    energies = [v["energy"] for v in per_layer.values()]
    metrics = {
        "layers": len(ranks),
        "rank_min": min(ranks),
        "rank_max": max(ranks),
        "forget_energy_removed_mean": round(sum(energies) / len(energies), 6),
        "forget_energy_removed_min": round(min(energies), 6),
        "retain_kv_change_mean": round(sum(changes) / len(changes), 6),
        "retain_kv_change_max": round(max(changes), 6),
        "per_layer": per_layer,
    }
    patch = ErasurePatch(
        "pure", spec.name, tuple(deltas), concept=request.to_dict(), fit_config=config,
        fingerprint=fingerprint, metrics=metrics,
    )  # fmt: skip
    return patch, per_layer


def _draw(per_layer: dict[str, dict[str, float]], title: str) -> torch.Tensor:
    fig, ax = new_figure(8.0, 3.6)
    names = list(per_layer)
    x = range(len(names))
    ax.bar(x, [per_layer[n]["energy"] for n in names], color="#c44", label="forget read energy removed")
    ax.plot(x, [per_layer[n]["retain_change"] for n in names], "o-", color="#36c", label="retain K/V change (rel.)")
    ax.set_xticks(list(x), [str(i) for i in x], fontsize=7)
    ax.set_xlabel("cross-attention layer")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    return figure_to_image(fig)


def apply_pure(model: Any, patch: ErasurePatch, strength: float = 1.0) -> Any:
    """A clone of ``model`` with the PURE K/V deltas at ``strength`` (0 = the original weights)."""
    if patch.method != "pure":
        raise PatchMismatchError(
            f"this is a {patch.method} patch, not a PURE one; apply it with the 'Apply Erasure Patch' node"
        )
    if not patch.model_deltas():
        raise PatchMismatchError("this PURE patch has no K/V deltas for the diffusion model")
    return apply_weight_patch(model, None, patch, strength)[0]
