"""A real ComfyUI server on 127.0.0.1 with this pack installed, driven over HTTP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from .client import client_module
from .net import free_port
from .paths import PACK_ROOT

START_TIMEOUT_S = 300
BASE_FOLDERS = ("models/checkpoints", "models/layer_model", "custom_nodes", "input", "output", "user", "temp")


class ServerError(RuntimeError):
    """The server did not start, or died; the message holds the end of its log."""


class ComfyServer:
    def __init__(self, url: str, base: Path, process: subprocess.Popen, log: Path):
        self.url, self.base, self.process, self.log = url, base, process, log

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def run(self, prompt: dict, timeout_s: float = 600) -> dict:
        """Queue an API-format prompt and wait for it; returns its /history entry."""
        status, body = self.post("/prompt", {"prompt": prompt})
        assert status == 200, f"prompt rejected: {json.dumps(body)[:3000]}"
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:  # written once the prompt has finished, with or without error
                return history[prompt_id]
            if self.process.poll() is not None:
                raise ServerError("the server died: " + self.log_tail())
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout_s}s")

    def output_files(self, entry: dict, node_id: str) -> list[Path]:
        images = entry["outputs"][node_id]["images"]
        return [self.base / image["type"] / image.get("subfolder", "") / image["filename"] for image in images]

    def log_tail(self, chars: int = 5000) -> str:
        return self.log.read_text()[-chars:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def assert_success(entry: dict) -> dict:
    """`entry` (a /history entry) finished without error; else fail with what the client tells its
    users: the node and its exception, not cut off as a whole status can be."""
    if entry["status"]["status_str"] != "success":
        raise AssertionError(client_module().describe_failure(entry))
    return entry


def make_base(base: Path) -> Path:
    """A ComfyUI base directory (--base-directory) with the pack linked into its custom_nodes."""
    for sub in BASE_FOLDERS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_ROOT.name
    if not link.exists():
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    return base


def link_into(base: Path, folder: str, source: Path, name: str | None = None) -> Path:
    """Symlink `source` into base/models/<folder> (under `name`, default its own)."""
    target = base / "models" / folder / (name or source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(source)
    return target


def start(comfy: Path, base: Path, extra_args: Sequence[str] = ()) -> ComfyServer:
    """ComfyUI (--cpu) on a free loopback port with `base` as its base directory; returns once it
    answers. The caller stops it."""
    port = free_port()
    log = base / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(comfy / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", "--disable-api-nodes", *extra_args]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=str(comfy), stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, process, log)
    deadline = time.time() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise ServerError("ComfyUI exited during start-up:\n" + server.log_tail())
        try:
            server.get("/system_stats")
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.time() > deadline:
                process.kill()
                raise ServerError("ComfyUI did not start in time:\n" + server.log_tail())
            time.sleep(1)
