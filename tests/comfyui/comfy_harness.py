"""Helpers for the opt-in ComfyUI tests: a temporary ComfyUI base directory with the pack and a tiny
checkpoint, a server process (always stopped by PID), and a websocket/HTTP client.

Imported only under ComfyUI's python (``COMFYUI_PYTHON``: it has aiohttp and PIL). Nothing here fetches
or installs ComfyUI: it uses the checkout named by ``COMFYUI_DIR``.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_API = Path(__file__).resolve().parent / "workflows_api"
PACK_NAME = "SlimDiff"
# The example workflows name the usual SD1.5 checkpoint; the tests give the tiny one that name.
CHECKPOINT_NAME = "v1-5-pruned-emaonly.safetensors"


def comfyui_dir() -> Path:
    return Path(os.environ["COMFYUI_DIR"]).resolve()


def comfyui_python() -> str:
    return os.environ.get("COMFYUI_PYTHON") or sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_dir() -> Path:
    """Where the tiny checkpoint (433 MB, ~20 s to make) is kept between runs."""
    folder = Path(os.environ.get("SLIMDIFF_COMFY_CACHE") or Path(tempfile.gettempdir()) / f"slimdiff-comfy-{os.getuid()}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def tiny_checkpoint(seed: int = 0) -> Path:
    path = cache_dir() / f"tiny_sd15_seed{seed}.safetensors"
    if not path.exists():
        tmp = path.with_name(path.name + ".partial")
        make_checkpoint(tmp, seed)
        os.replace(tmp, path)
    return path


def make_checkpoint(path: Path, seed: int = 0) -> None:
    """Run make_tiny_checkpoint.py with ComfyUI's python (a separate process: it sets ComfyUI's CLI args)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(comfyui_dir()))
    subprocess.run([comfyui_python(), str(Path(__file__).with_name("make_tiny_checkpoint.py")), str(path), str(seed)],
                   check=True, cwd=comfyui_dir(), env=env, timeout=600)


def prepare_base_dir(base: Path, checkpoint: Path) -> Path:
    """A ComfyUI --base-directory with the pack linked into custom_nodes and the tiny checkpoint (outputs and
    slim models of earlier runs removed)."""
    for stale in ("models/slim_models", "output"):
        shutil.rmtree(base / stale, ignore_errors=True)
    for sub in ("custom_nodes", "models/checkpoints", "models/slim_models", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    _link(base / "custom_nodes" / PACK_NAME, REPO_ROOT, directory=True)
    _link(base / "models" / "checkpoints" / CHECKPOINT_NAME, checkpoint)
    return base


def _link(link: Path, target: Path, directory: bool = False) -> None:
    """``link`` -> ``target``; a link left by an earlier run to another checkout (or a dangling one) is replaced,
    so the pack ComfyUI loads is always this checkout."""
    if link.is_symlink():
        if Path(os.readlink(link)) == Path(target):
            return
        link.unlink()
    link.symlink_to(target, target_is_directory=directory)


def load_api_workflow(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOWS_API / f"{name}.json").read_text())


def fast(prompt: dict[str, Any], size: int = 128, steps: int = 8) -> dict[str, Any]:
    """The same graph with a small latent and few steps (the tests' only change to the examples)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = size
        if "steps" in inputs and not isinstance(inputs["steps"], list):
            inputs["steps"] = steps
    return prompt


@dataclass
class PromptRun:
    prompt_id: str
    status_code: int
    response: dict[str, Any]
    messages: list[dict[str, Any]] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str | None:
        return self.history.get("status", {}).get("status_str")

    def message(self, kind: str) -> dict[str, Any] | None:
        return next((m["data"] for m in self.messages if m.get("type") == kind), None)


class ComfyServer:
    """A ComfyUI server on a free port; use as a context manager (stops the process it started, by PID)."""

    def __init__(self, base: Path, log_path: Path, extra_args: tuple[str, ...] = ()):
        self.base = base
        self.log_path = log_path
        self.extra_args = tuple(extra_args)  # e.g. ("--front-end-root", DIR)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ComfyServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout: float = 180.0) -> None:
        cmd = [comfyui_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:", "--disable-api-nodes", *self.extra_args]
        self._log = open(self.log_path, "w")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.process = subprocess.Popen(cmd, cwd=comfyui_dir(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}; log: {self.log_tail()}")
            try:
                self.get("/object_info/SlimModel")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s; log: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # our own child, by PID
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self.process = None
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- HTTP ---------------------------------------------------------------------------------------

    def get(self, route: str) -> Any:
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return json.loads(response.read())

    def post(self, route: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return response.status, (json.loads(body) if body else {})
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    # -- running prompts ----------------------------------------------------------------------------

    def run(self, prompt: dict[str, Any], timeout: float = 600.0, interrupt_when=None) -> PromptRun:
        """Queue ``prompt`` and collect websocket messages until it finishes (success, error or interrupt).

        ``interrupt_when(message) -> bool``: POST /interrupt the first time it returns True.
        """
        return asyncio.run(self._run(prompt, timeout, interrupt_when))

    async def _run(self, prompt: dict[str, Any], timeout: float, interrupt_when) -> PromptRun:
        import aiohttp

        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}", max_msg_size=0) as ws:
                status, response = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
                run = PromptRun(response.get("prompt_id", ""), status, response)
                if status != 200:
                    return run
                interrupted = False
                deadline = time.monotonic() + timeout
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"prompt {run.prompt_id} did not finish in {timeout}s; "
                                           f"log: {self.log_tail()}")
                    msg = await ws.receive(timeout=remaining)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            raise ConnectionError("websocket closed")
                        continue  # binary previews
                    data = json.loads(msg.data)
                    if data.get("data", {}).get("prompt_id") not in (None, run.prompt_id):
                        continue
                    run.messages.append(data)
                    if interrupt_when is not None and not interrupted and interrupt_when(data):
                        interrupted = True
                        self.post("/interrupt", {})
                    kind = data.get("type")
                    if kind in ("execution_error", "execution_interrupted", "execution_success"):
                        break
                    if kind == "executing" and data["data"].get("node") is None:
                        break
        for _ in range(100):  # history is written right after the last message
            history = self.get(f"/history/{run.prompt_id}")
            if run.prompt_id in history:
                run.history = history[run.prompt_id]
                break
            await asyncio.sleep(0.1)
        return run


def output_files(base: Path, subfolder: str, prefix: str) -> list[Path]:
    return sorted((base / "output" / subfolder).glob(f"{prefix}_*.png"))


def copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


if __name__ == "__main__":  # manual use: python comfy_harness.py BASE_DIR  (serves until Ctrl-C)
    base_dir = Path(sys.argv[1])
    with ComfyServer(base_dir, base_dir / "server.log") as server:
        print(server.url, flush=True)
        while True:
            time.sleep(3600)
