"""The ErasurePatch: one in-memory object and one ``.safetensors`` file for every method.

Content
-------
* ``WeightDelta``: an additive edit ``W' = W + s * Delta`` of one weight, keyed by the
  ComfyUI state-dict key of that weight (``diffusion_model.<path>.weight`` on the
  MODEL patcher, ``clip_l.transformer.<...>.weight`` on the CLIP patcher), optionally
  restricted to a row slice ``offset = (dim, start, length)`` of a fused weight
  (Flux ``txt_attn.qkv``). Stored low rank, ``Delta = up @ down`` with
  ``up: (d_out, r)``, ``down: (r, d_in)``, when that is smaller, dense otherwise.
* ``ClearModule``: a CLEAR intervention at one text-encoder block (SAE tensors,
  specific-feature mask, normalisation scale, default strength).
* ``metadata``: strings, JSON inside: format version, method, model family,
  concept request, fit config, base-weight fingerprints, metrics, pack version.

File layout
-----------
Tensor names follow ComfyUI's stock LoRA loader, so a weight-edit patch also loads
with the core "Load LoRA" node (``comfy/lora.py``):

* MODEL deltas: ``<lora_name>.lora_up.weight`` / ``<lora_name>.lora_down.weight`` or
  ``<lora_name>.diff``, with ``lora_name`` defaulting to the key without ``.weight``
  (``diffusion_model.<path>``, the generic format ComfyUI maps to the key itself);
* CLIP deltas: ``text_encoders.<key without .weight>`` as base name;
* CLEAR modules: ``erasure_clear.<i>.<tensor>`` (ignored, with a warning, by LoRA loaders).

The metadata entry ``erasure_index`` lists every delta and module with its file names
and shapes; loading checks each tensor against it and raises ``PatchFileError`` with a
specific message for each malformed case. Only safetensors is read: no pickle, ever.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import PatchFileError

log = logging.getLogger(__name__)

#: permissions of written patch files (rw-r--r--, like files ComfyUI downloads)
_FILE_MODE = 0o644

FORMAT_NAME = "comfyui-concept-erasure"
FORMAT_VERSION = 1
METHODS = ("clear", "pure", "hirm", "erasepro", "uce")
MODEL_FAMILIES = ("sd15", "sdxl", "flux", "wan21", "wan22_5b", "hf", "generic")
Target = Literal["model", "clip"]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CLEAR_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "mask")


@dataclass(frozen=True)
class WeightDelta:
    """An additive edit of one weight: ``W' = W + strength * Delta``.

    ``Delta = up @ down`` (``up``: ``(d_out, r)``, ``down``: ``(r, d_in)``) or ``dense``
    (``(d_out, d_in)``), where ``(d_out, d_in)`` is the shape of the edited slice:
    the whole weight, or rows ``start:start+length`` along ``dim`` when ``offset`` is set.
    """

    key: str
    target: Target
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    offset: tuple[int, int, int] | None = None
    lora_name: str | None = None

    def __post_init__(self) -> None:
        if self.target not in ("model", "clip"):
            raise PatchFileError(f"delta {self.key!r}: target must be 'model' or 'clip', got {self.target!r}")
        low_rank = self.up is not None and self.down is not None
        if low_rank == (self.dense is not None) or (self.up is None) != (self.down is None):
            raise PatchFileError(
                f"delta {self.key!r}: give either up and down factors or a dense tensor, not both or neither"
            )
        if low_rank:
            if self.up.ndim != 2 or self.down.ndim != 2 or self.up.shape[1] != self.down.shape[0]:
                raise PatchFileError(
                    f"delta {self.key!r}: up {tuple(self.up.shape)} and down {tuple(self.down.shape)} "
                    "must be (d_out, r) and (r, d_in)"
                )
        if self.offset is not None and len(self.offset) != 3:
            raise PatchFileError(f"delta {self.key!r}: offset must be (dim, start, length), got {self.offset!r}")

    @property
    def is_low_rank(self) -> bool:
        return self.dense is None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the edited weight slice, ``(d_out, d_in)``."""
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (self.up.shape[0], self.down.shape[1])

    @property
    def rank(self) -> int:
        return self.up.shape[1] if self.dense is None else min(self.dense.shape)

    @property
    def file_base(self) -> str:
        """Base tensor name in the file (what ComfyUI's LoRA key map resolves to ``key``)."""
        if self.lora_name:
            return self.lora_name
        stem = self.key[: -len(".weight")] if self.key.endswith(".weight") else self.key
        return f"text_encoders.{stem}" if self.target == "clip" else stem

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``Delta`` (``(d_out, d_in)``) in ``dtype``."""
        if self.dense is not None:
            return self.dense.to(dtype)
        return self.up.to(dtype) @ self.down.to(dtype)

    def numel(self) -> int:
        if self.dense is not None:
            return self.dense.numel()
        return self.up.numel() + self.down.numel()


def make_delta(
    key: str,
    target: Target,
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    offset: tuple[int, int, int] | None = None,
    lora_name: str | None = None,
) -> WeightDelta:
    """A ``WeightDelta`` from factors ``up @ down``, kept low rank only where that is smaller.

    METHODS.md: factors when ``r < min(d_out, d_in) / 2``, dense otherwise.
    """
    r = up.shape[1]
    d_out, d_in = up.shape[0], down.shape[1]
    if r < min(d_out, d_in) / 2:
        return WeightDelta(key, target, up=up.contiguous(), down=down.contiguous(), offset=offset, lora_name=lora_name)
    return WeightDelta(key, target, dense=(up.float() @ down.float()).to(up.dtype), offset=offset, lora_name=lora_name)


@dataclass(frozen=True)
class ClearModule:
    """A CLEAR intervention at the output of one text-encoder block.

    ``h' = h - gamma * scale * W_dec (f * mask)``, ``f = act(W_enc (h / scale - b_dec) + b_enc)``
    with ``W_enc: (m, d)``, ``b_enc: (m,)``, ``W_dec: (d, m)``, ``b_dec: (d,)``, ``mask: (m,)`` bool.
    ``block_path`` is the module path relative to the CLIP patcher's model
    (``umt5xxl.transformer.encoder.block.5``) or to the HF encoder root.
    ``topk`` > 0 selects a TopK activation, 0 a ReLU.
    """

    encoder: str
    block: int
    block_path: str
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    mask: torch.Tensor
    scale: float
    topk: int = 0
    default_strength: float = 1.0
    concept: str = ""

    def __post_init__(self) -> None:
        m, d = self.W_enc.shape
        expected = {"b_enc": (m,), "W_dec": (d, m), "b_dec": (d,), "mask": (m,)}
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise PatchFileError(f"CLEAR module at {self.block_path!r}: {name} has shape {got}, expected {shape}")
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise PatchFileError(
                f"CLEAR module at {self.block_path!r}: scale must be a positive number, got {self.scale}"
            )

    @property
    def width(self) -> int:
        return self.W_dec.shape[0]


@dataclass(frozen=True)
class ErasurePatch:
    """Everything one fit produced, for every method; see the module docstring."""

    method: str
    model_family: str
    deltas: tuple[WeightDelta, ...] = ()
    clear_modules: tuple[ClearModule, ...] = ()
    concept: dict[str, Any] = field(default_factory=dict)
    fit_config: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    pack_version: str = __version__

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PatchFileError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.model_family not in MODEL_FAMILIES:
            raise PatchFileError(
                f"unknown model family {self.model_family!r}; expected one of {', '.join(MODEL_FAMILIES)}"
            )
        seen: set[tuple[str, Any]] = set()
        for d in self.deltas:
            ident = (d.key, d.offset)
            if ident in seen:
                raise PatchFileError(f"delta {d.key!r} (offset {d.offset}) appears twice")
            seen.add(ident)

    def model_deltas(self) -> list[WeightDelta]:
        return [d for d in self.deltas if d.target == "model"]

    def clip_deltas(self) -> list[WeightDelta]:
        return [d for d in self.deltas if d.target == "clip"]

    def num_parameters(self) -> int:
        n = sum(d.numel() for d in self.deltas)
        for c in self.clear_modules:
            n += sum(getattr(c, t).numel() for t in _CLEAR_TENSORS)
        return n

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description (what ``inspect`` prints)."""
        return {
            "method": self.method,
            "model_family": self.model_family,
            "pack_version": self.pack_version,
            "concept": self.concept,
            "fit_config": self.fit_config,
            "metrics": self.metrics,
            "num_deltas": len(self.deltas),
            "num_model_deltas": len(self.model_deltas()),
            "num_clip_deltas": len(self.clip_deltas()),
            "num_clear_modules": len(self.clear_modules),
            "num_parameters": self.num_parameters(),
            "deltas": [
                {
                    "key": d.key,
                    "target": d.target,
                    "kind": "lowrank" if d.is_low_rank else "dense",
                    "shape": list(d.shape),
                    "rank": d.rank,
                    "offset": list(d.offset) if d.offset else None,
                }
                for d in self.deltas
            ],
            "clear_modules": [
                {
                    "encoder": c.encoder,
                    "block": c.block,
                    "block_path": c.block_path,
                    "width": c.width,
                    "features": c.W_enc.shape[0],
                    "specific_features": int(c.mask.sum()),
                    "scale": c.scale,
                    "topk": c.topk,
                    "default_strength": c.default_strength,
                    "concept": c.concept,
                }
                for c in self.clear_modules
            ],
        }

    # ------------------------------------------------------------------ file I/O
    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The safetensors payload: ``(tensors, metadata)``."""
        tensors: dict[str, torch.Tensor] = {}
        index_deltas = []
        for d in self.deltas:
            base = d.file_base
            if d.is_low_rank:
                names = {"up": f"{base}.lora_up.weight", "down": f"{base}.lora_down.weight"}
                values = {"up": d.up, "down": d.down}
            else:
                names = {"dense": f"{base}.diff"}
                values = {"dense": d.dense}
            for part, n in names.items():
                if n in tensors:
                    raise PatchFileError(f"two deltas write the same tensor name {n!r}; give them distinct lora_name")
                tensors[n] = values[part]
            index_deltas.append(
                {
                    "key": d.key,
                    "target": d.target,
                    "offset": list(d.offset) if d.offset else None,
                    "tensors": names,
                    "shape": list(d.shape),
                }
            )
        index_clear = []
        for i, c in enumerate(self.clear_modules):
            prefix = f"erasure_clear.{i}"
            for t in _CLEAR_TENSORS:
                v = getattr(c, t)
                tensors[f"{prefix}.{t}"] = v.to(torch.uint8) if t == "mask" else v
            index_clear.append(
                {
                    "prefix": prefix,
                    "encoder": c.encoder,
                    "block": c.block,
                    "block_path": c.block_path,
                    "scale": c.scale,
                    "topk": c.topk,
                    "default_strength": c.default_strength,
                    "concept": c.concept,
                    "width": c.width,
                    "features": c.W_enc.shape[0],
                }
            )
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "method": self.method,
            "model_family": self.model_family,
            "pack_version": self.pack_version,
            "concept": json.dumps(self.concept),
            "fit_config": json.dumps(self.fit_config),
            "fingerprint": json.dumps(self.fingerprint),
            "metrics": json.dumps(self.metrics),
            "erasure_index": json.dumps({"deltas": index_deltas, "clear_modules": index_clear}),
        }
        return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the patch atomically (temporary file in the same folder, then rename).

        Raises ``FileExistsError`` if ``path`` exists and ``overwrite`` is false.
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            raise PatchFileError(f"patch files end in .safetensors, got {path.name!r}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True")
        tensors, metadata = self.to_tensors()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; a patch file is as readable as any model file
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("wrote erasure patch %s (%d tensors)", path, len(tensors))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ErasurePatch:
        """Read and validate a patch file; see ``from_tensors`` for the checks."""
        path = Path(path)
        if not path.is_file():
            raise PatchFileError(f"no patch file at {path}")
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise PatchFileError(
                f"{path.name} is not a readable safetensors file (truncated or corrupt?): {e}. "
                "Re-download or re-save the patch."
            ) from None
        return cls.from_tensors(tensors, metadata, source=path.name)

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, source: str = "patch"
    ) -> ErasurePatch:
        """Validate a safetensors payload and build the patch; raises ``PatchFileError``."""
        fmt = metadata.get("format")
        if fmt != FORMAT_NAME:
            raise PatchFileError(
                f"{source} is not a concept-erasure patch (metadata 'format' is {fmt!r}, expected {FORMAT_NAME!r}). "
                "If it is a LoRA, load it with ComfyUI's 'Load LoRA' node instead."
            )
        version = metadata.get("format_version")
        if version is None:
            raise PatchFileError(f"{source} has no 'format_version' in its metadata; it was not written by this pack")
        if not version.isdigit() or int(version) != FORMAT_VERSION:
            raise PatchFileError(
                f"{source} has format version {version!r}; this pack reads version {FORMAT_VERSION}. "
                "Update the pack (or re-fit the patch with this version)."
            )
        fields = {}
        for name in ("method", "model_family", "pack_version"):
            if name not in metadata:
                raise PatchFileError(f"{source}: metadata field {name!r} is missing")
            fields[name] = metadata[name]
        for name in ("concept", "fit_config", "fingerprint", "metrics", "erasure_index"):
            if name not in metadata:
                raise PatchFileError(f"{source}: metadata field {name!r} is missing")
            try:
                fields[name] = json.loads(metadata[name])
            except json.JSONDecodeError as e:
                raise PatchFileError(f"{source}: metadata field {name!r} is not valid JSON ({e.msg})") from None
            if not isinstance(fields[name], dict):
                raise PatchFileError(f"{source}: metadata field {name!r} must be a JSON object")
        index = fields.pop("erasure_index")
        used: set[str] = set()

        def tensor(name: str, *, floating: bool = True) -> torch.Tensor:
            if not isinstance(name, str) or name not in tensors:
                raise PatchFileError(f"{source}: tensor {name!r} listed in the index is missing from the file")
            t = tensors[name]
            if floating and t.dtype not in _FLOAT_DTYPES:
                raise PatchFileError(f"{source}: tensor {name!r} has dtype {t.dtype}, expected a floating-point dtype")
            if floating and not torch.isfinite(t).all():
                raise PatchFileError(f"{source}: tensor {name!r} contains NaN or infinite values")
            used.add(name)
            return t

        deltas = []
        try:
            for entry in index.get("deltas", []):
                key, names, shape = entry["key"], entry["tensors"], tuple(entry["shape"])
                offset = tuple(entry["offset"]) if entry.get("offset") else None
                if "dense" in names:
                    d = WeightDelta(key, entry["target"], dense=tensor(names["dense"]), offset=offset)
                else:
                    d = WeightDelta(
                        key, entry["target"], up=tensor(names["up"]), down=tensor(names["down"]), offset=offset
                    )
                if d.shape != shape:
                    raise PatchFileError(f"{source}: delta {key!r} has shape {d.shape}, index says {shape}")
                # strip only the exact suffix: a key or lora_name may contain ".diff" elsewhere (".diff_proj")
                if "dense" in names:
                    base = names["dense"].removesuffix(".diff")
                else:
                    base = names["up"].removesuffix(".lora_up.weight")
                deltas.append(
                    WeightDelta(
                        key,
                        d.target,
                        up=d.up,
                        down=d.down,
                        dense=d.dense,
                        offset=offset,
                        lora_name=base if base != d.file_base else None,
                    )
                )
            modules = []
            for entry in index.get("clear_modules", []):
                p = entry["prefix"]
                mask = tensor(f"{p}.mask", floating=False)
                if mask.dtype not in (torch.uint8, torch.bool):
                    raise PatchFileError(f"{source}: tensor {p}.mask has dtype {mask.dtype}, expected uint8 or bool")
                modules.append(
                    ClearModule(
                        encoder=str(entry["encoder"]),
                        block=int(entry["block"]),
                        block_path=str(entry["block_path"]),
                        W_enc=tensor(f"{p}.W_enc"),
                        b_enc=tensor(f"{p}.b_enc"),
                        W_dec=tensor(f"{p}.W_dec"),
                        b_dec=tensor(f"{p}.b_dec"),
                        mask=mask.bool(),
                        scale=float(entry["scale"]),
                        topk=int(entry.get("topk", 0)),
                        default_strength=float(entry.get("default_strength", 1.0)),
                        concept=str(entry.get("concept", "")),
                    )
                )
        except (KeyError, TypeError) as e:
            raise PatchFileError(f"{source}: the erasure index is malformed (missing or wrong field {e})") from None
        unknown = sorted(set(tensors) - used)
        if unknown:
            raise PatchFileError(f"{source}: tensors not listed in the index: {', '.join(unknown[:5])}")
        return cls(deltas=tuple(deltas), clear_modules=tuple(modules), **fields)


def weight_fingerprint(weight: torch.Tensor, *, samples: int = 4096, probes: int = 16) -> dict[str, Any]:
    """A dtype-robust fingerprint of a base weight: shape, statistics and a few values of a strided sample.

    Stored per edited key so that a patch applied to other base weights is detected.
    The statistics (mean, std, mean |w|) are computed in float64 on at most ``samples``
    evenly strided entries, rounded to 4 significant digits; ``probe`` holds ``probes``
    evenly strided entries of that sample. Statistics alone cannot tell apart two
    weights drawn from the same distribution (two random inits, or two checkpoints of
    one architecture agree to 2% about 80% of the time); the probe values can. The
    fp16, bf16 and fp8 copies of one checkpoint agree, different checkpoints almost
    surely do not.
    """
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    s = flat[::step][:samples].to(torch.float64)
    probe = s[:: max(1, s.numel() // probes)][:probes]
    return {
        "shape": list(weight.shape),
        "mean": float(f"{s.mean().item():.4g}"),
        "std": float(f"{s.std().item() if s.numel() > 1 else 0.0:.4g}"),
        "absmean": float(f"{s.abs().mean().item():.4g}"),
        "probe": [float(f"{v:.4g}") for v in probe.tolist()],
    }


def fingerprints_match(a: dict[str, Any], b: dict[str, Any], *, rtol: float = 0.02) -> bool:
    """Whether two ``weight_fingerprint`` results describe the same base weight.

    Probe values (absent in fingerprints of older files, then skipped) must agree within
    ``0.1 |w| + 0.1 std``: the rounding of fp8 e4m3 (6% relative, subnormals below
    ``2^-6``) stays inside, two independent weights fail on some of the 16 probes.
    """
    if a.get("shape") != b.get("shape"):
        return False
    for k in ("std", "absmean"):
        x, y = float(a.get(k, 0.0)), float(b.get(k, 0.0))
        if abs(x - y) > rtol * max(abs(x), abs(y), 1e-12):
            return False
    scale = max(float(a.get("std", 0.0)), 1e-12)
    if abs(float(a.get("mean", 0.0)) - float(b.get("mean", 0.0))) > 0.05 * scale:
        return False
    pa, pb = a.get("probe"), b.get("probe")
    if pa is None or pb is None:
        return True
    if len(pa) != len(pb):
        return False
    return all(abs(float(x) - float(y)) <= 0.1 * abs(float(x)) + 0.1 * scale for x, y in zip(pa, pb))
