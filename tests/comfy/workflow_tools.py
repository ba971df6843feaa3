"""Example workflows in the real ComfyUI: load the pack, convert UI -> API format, build UI files.

ComfyUI's Python side has no converter from the editor's UI format (``nodes`` with
positional ``widgets_values`` + ``links``) to the API prompt ``/prompt`` takes (the
frontend's graphToPrompt does it). ``ui_to_api`` does the same: widget values are
mapped in schema order onto the widget inputs (INT/FLOAT/STRING/BOOLEAN/COMBO not
forced to sockets), skipping the extra ``control_after_generate`` value the frontend
stores after seed widgets and the upload-button value after upload combos; links
become ``[source_id, output_index]``. ``WorkflowBuilder`` writes UI files from the
same live schemas, so widget orders match what the editor saves.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import comfy_env

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
#: frontend-only nodes (no Python class, never in the API prompt)
VIRTUAL_NODES = {"Note", "MarkdownNote"}
_UPLOAD_KEYS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
#: combo input name -> model folder, for placeholder files
MODEL_INPUTS = {
    "ckpt_name": "checkpoints",
    "unet_name": "diffusion_models",
    "clip_name": "text_encoders",
    "vae_name": "vae",
    "lora_name": "loras",
    "patch_name": "erasure_patches",
}

_LOADED: list[Any] = []


def load_comfy_with_pack() -> Any:
    """ComfyUI's core nodes plus this pack, loaded in-process by ``nodes.load_custom_node``. Idempotent.

    ComfyUI imports the pack under its file path as the module name, so the node classes the
    executor runs are a second copy beside ``comfy_env.load_pack``'s ``comfyui_concept_erasure``
    package: monkeypatch that copy (see ``test_executor.loaded_pack_module``).
    """
    comfy_env.setup_comfyui()
    import nodes

    if not _LOADED:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        link = Path(tempfile.mkdtemp(prefix="ce_custom_nodes_")) / comfy_env.PACK_NAME
        link.symlink_to(comfy_env.REPO, target_is_directory=True)
        if not asyncio.run(nodes.load_custom_node(str(link))):
            raise RuntimeError("ComfyUI could not load the pack (see the log above)")
        _LOADED.append(nodes)
    return nodes


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: Any
    opts: dict[str, Any]
    optional: bool

    @property
    def is_widget(self) -> bool:
        kind = "COMBO" if isinstance(self.type, list) else self.type
        return kind in WIDGET_TYPES and not self.opts.get("forceInput")

    @property
    def extra_values(self) -> int:
        """Values the frontend stores after this widget's own (control_after_generate, upload button)."""
        n = 0
        cag = self.opts.get("control_after_generate")
        if cag or (self.type == "INT" and cag is None and self.name in ("seed", "noise_seed")):
            n += 1
        if any(self.opts.get(k) for k in _UPLOAD_KEYS):
            n += 1
        return n

    @property
    def default(self) -> Any:
        if "default" in self.opts:
            return self.opts["default"]
        if isinstance(self.type, list):
            return self.type[0] if self.type else None
        if self.type == "COMBO":
            options = self.opts.get("options") or []
            return options[0] if options else None
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(self.type)


def input_specs(class_type: str) -> list[InputSpec]:
    """The inputs of a node class in schema order (required, then optional)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    it = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, spec in (it.get(section) or {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append(InputSpec(name, spec[0], opts, section == "optional"))
    return out


def output_specs(class_type: str) -> list[tuple[str, str]]:
    """``(name, type)`` of each output."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    types = [str(t) for t in cls.RETURN_TYPES]
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    return list(zip(names, types))


def ui_to_api(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The API prompt of a UI-format workflow (see the module docstring)."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise NotImplementedError(f"node {node['id']} ({node['type']}) is bypassed: not supported here")
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                linked[inp["name"]] = [str(link[1]), link[2]]
        values = node.get("widgets_values") or []
        inputs: dict[str, Any] = {}
        i = 0
        for spec in input_specs(node["type"]):
            if spec.is_widget:
                if isinstance(values, dict):
                    value = values.get(spec.name, spec.default)
                else:
                    value = values[i] if i < len(values) else spec.default
                    i += 1 + spec.extra_values
                if spec.name in linked:
                    inputs[spec.name] = linked[spec.name]
                elif value is not None:
                    inputs[spec.name] = value
            elif spec.name in linked:
                inputs[spec.name] = linked[spec.name]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node["type"]}}
    return prompt


def model_files(workflow: dict[str, Any]) -> dict[str, set[str]]:
    """``{model folder: {file names}}`` a workflow's loaders refer to (for placeholder files)."""
    out: dict[str, set[str]] = {}
    for node in ui_to_api(workflow).values():
        for name, value in node["inputs"].items():
            if name in MODEL_INPUTS and isinstance(value, str):
                out.setdefault(MODEL_INPUTS[name], set()).add(value)
    return out


def validate(prompt: dict[str, Any]) -> tuple[bool, Any, list[str], dict[str, Any]]:
    """ComfyUI's own ``execution.validate_prompt`` (nothing runs)."""
    import execution

    return asyncio.run(execution.validate_prompt("validate-example", prompt, None))


# ----------------------------------------------------------------------------- building UI files
@dataclass
class _Node:
    id: int
    type: str
    pos: tuple[float, float]
    widgets: dict[str, Any]
    title: str | None = None
    size: tuple[float, float] | None = None
    inputs: dict[str, int | None] = field(default_factory=dict)
    outputs: dict[int, list[int]] = field(default_factory=dict)


class WorkflowBuilder:
    """Write editor-format (version 0.4) workflows from the live node schemas."""

    def __init__(self) -> None:
        self.nodes: list[_Node] = []
        self.links: list[list[Any]] = []

    def node(
        self,
        class_type: str,
        pos: tuple[float, float],
        title: str | None = None,
        size: tuple[float, float] | None = None,
        **widgets: Any,
    ) -> int:
        known = {s.name for s in input_specs(class_type) if s.is_widget} | {"control_after_generate"}
        unknown = set(widgets) - known
        if unknown:
            raise KeyError(f"{class_type} has no widget {', '.join(sorted(unknown))}")
        n = _Node(len(self.nodes) + 1, class_type, pos, widgets, title, size)
        self.nodes.append(n)
        return n.id

    def note(self, text: str, pos: tuple[float, float], size: tuple[float, float] = (420, 260)) -> int:
        n = _Node(len(self.nodes) + 1, "Note", pos, {"text": text}, "Note", size)
        self.nodes.append(n)
        return n.id

    def link(self, src: int, output: int | str, dst: int, input_name: str) -> None:
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        outs = output_specs(s.type)
        index = output if isinstance(output, int) else [n for n, _ in outs].index(output)
        specs = {sp.name: sp for sp in input_specs(d.type)}
        if input_name not in specs:
            raise KeyError(f"{d.type} has no input {input_name!r}")
        link_id = len(self.links) + 1
        self.links.append([link_id, src, index, dst, input_name, outs[index][1]])
        s.outputs.setdefault(index, []).append(link_id)

    def _widget_values(self, n: _Node) -> list[Any]:
        if n.type in VIRTUAL_NODES:
            return [n.widgets["text"]]
        values = []
        for spec in input_specs(n.type):
            if not spec.is_widget:
                continue
            values.append(n.widgets.get(spec.name, spec.default))
            if spec.extra_values:
                values.append(n.widgets.get("control_after_generate", "fixed"))
        return values

    def to_json(self) -> dict[str, Any]:
        slots: dict[int, int] = {}  # link id -> input slot on its target
        out_nodes = []
        for order, n in enumerate(self.nodes):
            inputs_ui, outputs_ui = [], []
            if n.type not in VIRTUAL_NODES:
                by_dst = {row[4]: row for row in self.links if row[3] == n.id}
                for s in (s for s in input_specs(n.type) if not s.is_widget):
                    row = by_dst.get(s.name)
                    typ = "COMBO" if isinstance(s.type, list) else str(s.type)
                    if row:
                        slots[row[0]] = len(inputs_ui)
                    inputs_ui.append({"name": s.name, "type": typ, "link": row[0] if row else None})
                outputs_ui = [
                    {"name": name, "type": typ, "links": n.outputs.get(i, []), "slot_index": i}
                    for i, (name, typ) in enumerate(output_specs(n.type))
                ]
            size = n.size or (320, 60 + 26 * (len(inputs_ui) + len(self._widget_values(n))))
            node = {
                "id": n.id,
                "type": n.type,
                "pos": list(n.pos),
                "size": list(size),
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": inputs_ui,
                "outputs": outputs_ui,
                "properties": {"Node name for S&R": n.type} if n.type not in VIRTUAL_NODES else {"text": ""},
                "widgets_values": self._widget_values(n),
            }
            if n.title:
                node["title"] = n.title
            if n.type in VIRTUAL_NODES:
                node["color"], node["bgcolor"] = "#432", "#653"
            out_nodes.append(node)
        links = [[i, src, out, dst, slots[i], typ] for i, src, out, dst, _name, typ in self.links]
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": out_nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}},
            "version": 0.4,
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
