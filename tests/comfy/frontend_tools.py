"""A real ComfyUI server and headless Chromium for the frontend tests, driven over the DevTools Protocol.

``ComfyServer`` runs ``~/ComfyUI/main.py`` in a subprocess (CPU mode, its own base
directory holding ``custom_nodes/comfyui_concept_erasure`` -> this repository and the
placeholder model files), through ``python frontend_tools.py serve ...``: that launcher
stubs torchvision the way ``comfy_env`` does (COMFYUI.md §5.2) before running main.py.
The frontend it serves is the ``comfyui-frontend-package`` wheel. ``Chromium`` starts
``chromium --headless=new --remote-debugging-port=...`` and ``Cdp`` talks to one page
target over websocket-client (``Runtime.evaluate``, ``Page.captureScreenshot``).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_chromium() -> str | None:
    """The Chromium binary (``$CHROMIUM`` first), or ``None``."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def frontend_missing_reason() -> str | None:
    """Why the frontend tests cannot run here, or ``None``."""
    import comfy_env

    reason = comfy_env.comfyui_missing_reason()
    if reason:
        return reason
    if find_chromium() is None:
        return "Chromium not found (apt-get install chromium, or set CHROMIUM): frontend tests skipped"
    for module, package in (
        ("comfyui_frontend_package", "comfyui-frontend-package"),
        ("websocket", "websocket-client"),
    ):
        try:
            __import__(module)
        except ImportError:
            return f"{package} is not installed (pip install -r tests/requirements-comfyui.txt): frontend tests skipped"
    return None


def _die_with_parent() -> None:
    """``preexec_fn``: on Linux, SIGTERM this child when the test process dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def http_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


# ----------------------------------------------------------------------------- ComfyUI server
class ComfyServer:
    """``main.py`` in a subprocess with ``base`` as its base directory; the log goes to ``base/server.log``."""

    def __init__(self, base: Path, comfyui: Path, pack: Path, port: int | None = None) -> None:
        self.base, self.comfyui, self.port = base, comfyui, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = base / "custom_nodes" / "comfyui_concept_erasure"
        if not link.exists():
            link.symlink_to(pack, target_is_directory=True)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        args = [
            sys.executable,
            str(HERE / "frontend_tools.py"),
            "serve",
            str(self.comfyui),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-auto-launch",
            "--disable-api-nodes",
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.base, preexec_fn=_die_with_parent
        )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def wait_ready(self, node_prefix: str, timeout: float = 150.0) -> dict[str, Any]:
        """Poll ``/object_info`` until it lists nodes starting with ``node_prefix``; returns it."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}\n{self.log_text()[-6000:]}")
            try:
                info = http_json(self.url + "/object_info", timeout=20)
                if any(k.startswith(node_prefix) for k in info):
                    return info
                last = f"/object_info has no {node_prefix}* node"
            except OSError as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"ComfyUI not ready after {timeout:.0f} s ({last})\n{self.log_text()[-6000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()


def _hide_unusable_packages() -> None:
    """Make packages ComfyUI would serve a missing folder of look absent (it then only logs an error).

    ComfyUI 0.3.64 serves ``comfyui_workflow_templates/templates`` at ``/templates`` and
    fails to start if the folder is not there, which is the case for the newer, split
    ``comfyui-workflow-templates`` (>= 0.2). Same for ``comfyui_embedded_docs/docs``.
    """
    import importlib.util

    for package, folder in (("comfyui_workflow_templates", "templates"), ("comfyui_embedded_docs", "docs")):
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            if not any(os.path.isdir(os.path.join(p, folder)) for p in spec.submodule_search_locations):
                sys.modules[package] = None  # type: ignore[assignment]  (import now raises ImportError)


def _serve(comfyui: str, argv: list[str]) -> None:
    """Run ComfyUI's main.py with ``argv`` in this process (torchvision stubbed if it does not import)."""
    from comfy_env import stub_torchvision  # this file's folder is still sys.path[0]

    sys.argv = [os.path.join(comfyui, "main.py"), *argv]
    sys.path[0] = comfyui  # instead of this file's folder
    stub_torchvision()
    _hide_unusable_packages()
    import runpy

    runpy.run_path(sys.argv[0], run_name="__main__")


# ----------------------------------------------------------------------------- Chromium over CDP
class CdpError(RuntimeError):
    pass


class Cdp:
    """One DevTools websocket connection to a page target; ``call`` waits for the matching reply."""

    def __init__(self, ws_url: str, timeout: float = 60.0) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.settimeout(timeout)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise CdpError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
                del self.events[:-500]

    def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        """The JSON value of ``expression`` (awaited if it is a promise); JS exceptions raise ``CdpError``."""
        r = self.call(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text")
            raise CdpError(f"JS exception: {text}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.25) -> Any:
        """Poll ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except CdpError:
                value = None
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"still falsy after {timeout:.0f} s: {expression}")

    def screenshot(self, *paths: Path) -> bytes:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        return data

    def close(self) -> None:
        self.ws.close()


class Chromium:
    """Headless Chromium with a DevTools port; ``page()`` connects to its first page target."""

    def __init__(self, binary: str, user_data_dir: Path, size: tuple[int, int] = (1600, 1000)) -> None:
        self.port = free_port()
        self.log_path = user_data_dir.parent / "chromium.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        args = [
            binary,
            "--headless=new",
            f"--remote-debugging-port={self.port}",
            "--remote-allow-origins=*",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={user_data_dir}",
            f"--window-size={size[0]},{size[1]}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    def page(self, timeout: float = 30.0) -> Cdp:
        deadline = time.monotonic() + timeout
        while True:
            try:
                targets = http_json(f"http://127.0.0.1:{self.port}/json/list", timeout=5)
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return Cdp(pages[0]["webSocketDebuggerUrl"])
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_text = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"Chromium DevTools not reachable on port {self.port}\n{log_text}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "serve":
    _serve(sys.argv[2], sys.argv[3:])
