"""Every example workflow loads in the real ComfyUI frontend, served by a real ComfyUI server with the pack.

A ComfyUI server (``main.py --cpu``) runs in a subprocess with its own base directory:
the pack linked into its ``custom_nodes``, empty placeholder files named as the
workflows' loaders expect, and user settings that skip the first-run dialog. Headless
Chromium opens the frontend (the ``comfyui-frontend-package`` wheel the server serves)
and, per workflow, ``app.loadGraphData`` must report no missing node type, raise no
dialog or validation toast, mark no node as failing, and leave every combo on a value
it offers; ``app.graphToPrompt`` (the frontend's own UI -> API conversion) must give the
prompt ``workflow_tools.ui_to_api`` gives, which ``test_workflows`` validates with
ComfyUI's ``validate_prompt``. (One accommodation: where a core loader node failed to
import, frontend 1.27.10 breaks every model-loader widget; ``_DROP_UNDEFINED_MODEL_PROVIDERS``
removes just those dangling entries and the run prints which.) A screenshot of the fitted graph goes to
``docs/screenshots/<workflow>.png`` and to the artifact folder (``$CE_ARTIFACTS_DIR``,
else ``artifacts/frontend``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import comfy_env
import pytest
from frontend_tools import Cdp, Chromium, ComfyServer, find_chromium, frontend_missing_reason

_REASON = frontend_missing_reason()
if _REASON:
    print(f"\ntest_frontend: skipped: {_REASON}")
    pytest.skip(_REASON, allow_module_level=True)

log = logging.getLogger(__name__)

WORKFLOWS = sorted((comfy_env.REPO / "workflows").glob("*.json"))
SCREENSHOTS = comfy_env.REPO / "docs" / "screenshots"
ARTIFACTS = Path(os.environ.get("CE_ARTIFACTS_DIR") or comfy_env.REPO / "artifacts" / "frontend")
NODE_PREFIX = "ConceptErasure"


# ----------------------------------------------------------------------------- the ComfyUI page
#: user settings written before the page opens: no first-run template dialog, no minimap or canvas
#: info overlay, full-detail node drawing at any zoom (so a fitted graph keeps its text), and the
#: open-workflow tabs in the side bar (the top bar then names just the workflow on screen)
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",
}

_PINIA = "document.getElementById('vue-app').__vue_app__.config.globalProperties.$pinia"

#: records toasts (workflow validation problems arrive as toasts) and the missing node types the
#: frontend reports to extensions (``afterConfigureGraph``) during ``app.loadGraphData``
_HOOKS = f"""(() => {{
  if (window.__ce) return true;
  window.__ce = {{toasts: [], missing: null}};
  {_PINIA}._s.get('toast').$onAction(({{name, args}}) => {{
    if (name === 'add' || name === 'addAlert') window.__ce.toasts.push(args[0]);
  }});
  app.registerExtension({{name: 'concept_erasure.frontendTest', afterConfigureGraph(missing) {{
    window.__ce.missing = [...missing].map(m => typeof m === 'string' ? m : m.type);
  }}}});
  return true;
}})()"""

_LOAD = """(async (wf, name) => {
  const pinia = __PINIA__;
  const ce = window.__ce;
  ce.toasts = []; ce.missing = null;
  const unregistered = wf.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types));
  await app.loadGraphData(wf, true, true, name);
  const ws = pinia._s.get('workflow');  // close the workflows loaded before (one open tab, as a user has)
  for (const w of [...ws.openWorkflows]) if (!ws.isActive(w)) await ws.closeWorkflow(w);
  await new Promise(r => requestAnimationFrame(() => r()));
  const badCombos = [];
  for (const n of app.graph.nodes) {
    for (const w of n.widgets ?? []) {
      if (w.type !== 'combo') continue;
      let values = w.options?.values;
      if (typeof values === 'function') values = values(w, n);
      if (Array.isArray(values) && !values.includes(w.value))
        badCombos.push(`${n.id} ${n.type}.${w.name} = ${JSON.stringify(w.value)} not in [${values.slice(0, 8)}]`);
    }
  }
  let prompt = null, promptError = null;
  try { prompt = (await app.graphToPrompt()).output; } catch (e) { promptError = String(e?.stack ?? e); }
  const links = app.graph.links;
  return {
    unregistered,
    missing: ce.missing,
    toasts: ce.toasts.map(t => ({severity: t.severity, summary: String(t.summary), detail: String(t.detail)})),
    dialogs: pinia._s.get('dialog').dialogStack.map(d => String(d.key)),
    nodes: app.graph.nodes.length,
    links: links instanceof Map ? links.size : Object.keys(links).length,
    nodeErrors: app.graph.nodes.filter(n => n.has_errors).map(n => `${n.id} ${n.type}`),
    badCombos, prompt, promptError,
  };
})""".replace("__PINIA__", _PINIA)


#: frontend 1.27.10 maps model folders to core loader nodes (``modelToNode`` store) and assumes every one
#: of them exists; where a core node failed to import (here ``UpscaleModelLoader``: spandrel needs the
#: real torchvision) its entry has no node definition and every model-loader combo widget then throws
#: in ``isAssetBrowserEligible`` and its node is drawn as failing. This drops such entries, and only those.
_DROP_UNDEFINED_MODEL_PROVIDERS = f"""(() => {{
  const s = {_PINIA}._s.get('modelToNode') ?? null;
  if (!s) return [];
  s.registerDefaults();
  const dropped = [];
  for (const [folder, providers] of Object.entries(s.modelToNodeMap)) {{
    const ok = providers.filter(p => p && p.nodeDef);
    if (ok.length !== providers.length) dropped.push(folder);
    s.modelToNodeMap[folder] = ok;
  }}
  return dropped;
}})()"""


#: zoom and pan the canvas so the graph fills the free area; ``(margin, maxScale) -> scale``
_FIT = """(async (margin, maxScale) => {
  app.canvas.deselectAll?.();
  const rect = (sel) => document.querySelector(sel)?.getBoundingClientRect();
  const el = app.canvas.canvas.getBoundingClientRect();
  const left = Math.max(el.left, rect('.side-tool-bar-container')?.right ?? 0) + margin;
  const top = Math.max(el.top, rect('.comfyui-body-top')?.bottom ?? 0, rect('.workflow-tabs-container')?.bottom ?? 0,
                       rect('.comfyui-menu')?.bottom ?? 0, 72) + margin;
  const right = el.right - margin, bottom = el.bottom - 64 - margin;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  const th = LiteGraph.NODE_TITLE_HEIGHT;
  for (const n of app.graph.nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - th);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const ds = app.canvas.ds;
  const scale = Math.min(maxScale, (right - left) / (x1 - x0), (bottom - top) / (y1 - y0));
  ds.scale = scale;
  const cx = (left + right) / 2 - el.left, cy = (top + bottom) / 2 - el.top;
  ds.offset = [cx / scale - (x0 + x1) / 2, cy / scale - (y0 + y1) / 2];
  app.graph.setDirtyCanvas(true, true);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r())));
  return scale;
})"""


class ComfyPage:
    """The ComfyUI frontend in a ``Cdp`` page: open it, load workflows, fit the view, take screenshots.

    The page is ``size`` CSS pixels; screenshots are ``pixel_ratio`` times that (sharper node text).
    """

    def __init__(self, cdp: Cdp, size: tuple[int, int] = (1600, 1000), pixel_ratio: float = 1.5) -> None:
        self.cdp = cdp
        self.dropped_model_folders: list[str] = []
        cdp.call("Page.enable")
        cdp.call("Runtime.enable")
        w, h = size
        cdp.call("Emulation.setDeviceMetricsOverride", width=w, height=h, deviceScaleFactor=pixel_ratio, mobile=False)

    def open(self, url: str, timeout: float = 90.0) -> str:
        """Navigate to the server and wait for ``app.graph``; returns the frontend version."""
        self.cdp.call("Page.navigate", url=url)
        self.cdp.wait_for("!!(window.app && window.app.graph && window.app.extensionManager?.command)", timeout)
        self.cdp.evaluate(_HOOKS)
        self.dropped_model_folders = self.cdp.evaluate(_DROP_UNDEFINED_MODEL_PROVIDERS)
        if self.dropped_model_folders:
            log.warning("model folders whose core loader node is missing: %s", self.dropped_model_folders)
        return self.cdp.evaluate("window.__COMFYUI_FRONTEND_VERSION__ ?? ''")

    def close_dialogs(self) -> list[str]:
        """Close any open dialog (first-run template browser, etc.); returns the keys it closed."""
        return self.cdp.evaluate(
            f"""(() => {{ const d = {_PINIA}._s.get('dialog'); const keys = d.dialogStack.map(x => String(x.key));
            for (const k of keys) d.closeDialog({{key: k}}); return keys; }})()"""
        )

    def js_errors(self) -> list[str]:
        """Uncaught JS exceptions and console errors seen since the last call."""
        out = []
        for e in self.cdp.events:
            if e["method"] == "Runtime.exceptionThrown":
                d = e["params"]["exceptionDetails"]
                out.append(d.get("exception", {}).get("description") or d.get("text", "?"))
            elif e["method"] == "Runtime.consoleAPICalled" and e["params"].get("type") == "error":
                args = e["params"].get("args", [])
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        self.cdp.events.clear()
        return out

    def load_workflow(self, workflow: dict[str, Any], name: str) -> dict[str, Any]:
        """``app.loadGraphData`` then the checks' raw facts (see ``_LOAD``) and ``graphToPrompt``'s output."""
        expr = f"({_LOAD})({json.dumps(workflow)}, {json.dumps(name)})"
        return self.cdp.evaluate(expr, timeout=60)

    def fit_view(self, margin: float = 24.0, max_scale: float = 1.0) -> float:
        """Zoom and pan so every node fills the canvas area not covered by the side bar, top bar and
        canvas toolbar; returns the scale. (``Comfy.Canvas.FitView`` leaves about a third empty.)"""
        return self.cdp.evaluate(f"({_FIT})({float(margin)}, {float(max_scale)})")


# ----------------------------------------------------------------------------- tests
def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """ComfyUI's base directory: placeholder model files for every workflow, and the user settings."""
    from workflow_tools import load_comfy_with_pack, model_files

    comfy_env.load_pack()
    load_comfy_with_pack()  # model_files reads the live node schemas
    base = tmp_path_factory.mktemp("comfy_base")
    for path in WORKFLOWS:
        for folder, names in model_files(_read(path)).items():
            for name in names:
                target = base / "models" / folder / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
    user = base / "user" / "default"
    user.mkdir(parents=True)
    (user / "comfy.settings.json").write_text(json.dumps(SETTINGS), encoding="utf-8")
    return base


@pytest.fixture(scope="module")
def server(base_dir, request):
    """A running ComfyUI with the pack; its log is printed if a test of this module failed, and kept."""
    srv = ComfyServer(base_dir, comfy_env.comfyui_path(), comfy_env.REPO)
    failed_before = request.session.testsfailed
    try:
        srv.start()
        srv.object_info = srv.wait_ready(NODE_PREFIX)
        yield srv
    finally:
        srv.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "server.log").write_text(srv.log_text(), encoding="utf-8")
        if request.session.testsfailed > failed_before:
            print(f"\n----- ComfyUI server log (tail; full log in {ARTIFACTS / 'server.log'}) -----")
            print(srv.log_text()[-8000:])


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    """The frontend open in headless Chromium, first-run dialogs closed."""
    profile = tmp_path_factory.mktemp("chromium") / "profile"
    browser = Chromium(find_chromium(), profile)
    cdp = None
    try:
        cdp = browser.page()
        ui = ComfyPage(cdp)
        version = ui.open(server.url + "/")
        print(f"\nComfyUI frontend {version} at {server.url}", end="")
        if ui.dropped_model_folders:
            print(f"; model folders whose core loader failed to import: {ui.dropped_model_folders}", end="")
        ui.close_dialogs()
        ui.js_errors()  # start-up noise (templates/docs packages absent) is not a workflow's fault
        yield ui
    finally:
        if cdp is not None:
            cdp.close()
        browser.stop()


def test_frontend_registers_every_pack_node(server, page):
    pack_nodes = sorted(k for k in server.object_info if k.startswith(NODE_PREFIX))
    assert len(pack_nodes) >= 6, pack_nodes
    registered = page.cdp.evaluate(f"{json.dumps(pack_nodes)}.filter(t => t in LiteGraph.registered_node_types)")
    assert registered == pack_nodes


def _schema_inputs(server, node: dict) -> dict:
    """A prompt node's inputs that its class declares in ``/object_info``."""
    spec = server.object_info[node["class_type"]]["input"]
    names = set(spec.get("required", {})) | set(spec.get("optional", {}))
    return {k: v for k, v in node["inputs"].items() if k in names}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_in_frontend(path, server, page):
    from workflow_tools import VIRTUAL_NODES, ui_to_api

    workflow = _read(path)
    r = page.load_workflow(workflow, path.stem)
    page.fit_view()
    shot = page.cdp.screenshot(ARTIFACTS / f"{path.stem}.png")  # kept even if a check below fails
    assert len(shot) > 10_000, "the screenshot is (nearly) empty"

    assert r["unregistered"] == [], f"node types the frontend does not know: {r['unregistered']}"
    assert r["missing"] == [], f"missing node types reported on load: {r['missing']}"
    assert r["dialogs"] == [], f"dialogs opened on load: {r['dialogs']}"
    problems = [t for t in r["toasts"] if t["severity"] in ("warn", "error")]
    assert not problems, f"validation/load toasts: {problems}"
    assert r["nodeErrors"] == [], f"nodes marked with errors: {r['nodeErrors']}"
    assert r["badCombos"] == [], f"combo values the frontend does not offer: {r['badCombos']}"
    assert r["nodes"] == len(workflow["nodes"])
    assert r["links"] == len(workflow["links"])
    errors = page.js_errors()
    assert not errors, f"JS errors while loading: {errors}"

    assert r["promptError"] is None, f"graphToPrompt failed: {r['promptError']}"
    # frontend-only widgets (PreviewAny's "preview" text box) are sent too; the server ignores them
    frontend = {i: (n["class_type"], _schema_inputs(server, n)) for i, n in r["prompt"].items()}
    ours = {i: (n["class_type"], n["inputs"]) for i, n in ui_to_api(workflow).items()}
    assert frontend == ours, "the frontend's graphToPrompt differs from workflow_tools.ui_to_api"
    assert not set(frontend) & {str(n["id"]) for n in workflow["nodes"] if n["type"] in VIRTUAL_NODES}
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS / f"{path.stem}.png").write_bytes(shot)  # the README's picture, only of a graph that passed


def test_frontend_check_sees_a_missing_node_type(page):
    """The checks above can fail: a node type nobody registers is reported, with the missing-nodes dialog."""
    workflow = _read(WORKFLOWS[0])
    node = next(n for n in workflow["nodes"] if n["type"].startswith(NODE_PREFIX))
    node["type"] = NODE_PREFIX + "NoSuchNode"
    r = page.load_workflow(workflow, "missing_node_check")
    try:
        assert r["unregistered"] == [node["type"]]
        assert r["missing"] == [node["type"]]
        assert r["dialogs"], "the frontend opened no missing-nodes dialog"
    finally:
        page.close_dialogs()
        page.js_errors()
