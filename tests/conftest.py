"""Shared fixtures: the testkit (synthetic weights, goldens), the ComfyUI host, a live server.

The host is found through COMFYUI_PATH, else the ComfyUI this pack is installed in
(ComfyUI/custom_nodes/<pack>), else comfy-cli's default workspace ~/comfy/ComfyUI. Tests that
need it skip with the reason when none is found.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import pytest

PACK_ROOT = Path(__file__).resolve().parents[1]
if str(PACK_ROOT) not in sys.path:
    # Appended, not prepended: the pack's `nodes` package must not shadow ComfyUI's nodes.py.
    sys.path.append(str(PACK_ROOT))

CACHE = Path(os.environ.get("LAYERDIFFUSE_TEST_CACHE", Path.home() / ".cache" / "comfyui-layerdiffuse" / "synth"))
SERVER_START_TIMEOUT_S = 300


def find_testkit() -> Optional[Path]:
    candidates = [os.environ.get("LAYERDIFFUSE_TESTKIT"), PACK_ROOT.parent / "shared" / "testkit"]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "synthweights.py").is_file():
            return Path(candidate)
    return None


def find_comfyui() -> tuple[Optional[Path], str]:
    """(path, how it was looked for) of a ComfyUI checkout."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(PACK_ROOT.parent.parent)
    candidates.append(Path.home() / "comfy" / "ComfyUI")
    for candidate in candidates:
        if (candidate / "comfy" / "model_management.py").is_file() and (candidate / "main.py").is_file():
            return candidate.resolve(), ""
    return None, "no ComfyUI found (looked at: " + ", ".join(map(str, candidates)) + "); set COMFYUI_PATH"


@pytest.fixture(scope="session")
def testkit() -> Path:
    path = find_testkit()
    if path is None:
        pytest.skip("the testkit (../shared/testkit or LAYERDIFFUSE_TESTKIT) is not available")
    return path


def _synthweights(testkit: Path):
    spec = importlib.util.spec_from_file_location("synthweights", testkit / "synthweights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def synth_weights(testkit: Path) -> Callable[..., Path]:
    """factory(manifest_stem, seed=0, dtype=None) -> path of a synthetic file of that layout,
    named like the official file, cached across runs (it is a pure function of its arguments)."""
    sw = _synthweights(testkit)

    def make(manifest_stem: str, seed: int = 0, dtype: Optional[str] = None) -> Path:
        from safetensors.torch import save_file

        manifest = sw.load_manifest(str(testkit / "manifests" / f"{manifest_stem}.json"))
        folder = CACHE / f"seed{seed}-{dtype or 'manifest'}"
        path = folder / manifest["file"]
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}.part")
            save_file(dict(sw.make_state_dict(manifest, seed=seed, dtype=dtype)), str(partial))
            os.replace(partial, path)
        return path

    return make


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    """The ComfyUI checkout, importable in this process on the CPU."""
    path, reason = find_comfyui()
    if path is None:
        pytest.skip(reason)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    return path


@pytest.fixture(scope="session")
def pack(comfyui_path: Path):
    """This pack loaded through ComfyUI's own custom-node loader; returns ComfyUI's `nodes` module."""
    import nodes as comfy_nodes

    loaded = asyncio.run(comfy_nodes.load_custom_node(str(PACK_ROOT)))
    assert loaded, "ComfyUI failed to load the pack (see the log above)"
    return comfy_nodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A real ComfyUI server on 127.0.0.1 with this pack installed, driven over HTTP."""

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
                return response.status, json.loads(response.read())
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
            assert self.process.poll() is None, "the server died: " + self.log.read_text()[-3000:]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout_s}s")

    def output_files(self, entry: dict, node_id: str) -> list[Path]:
        images = entry["outputs"][node_id]["images"]
        return [self.base / image["type"] / image.get("subfolder", "") / image["filename"] for image in images]


@pytest.fixture(scope="session")
def server_models(tmp_path_factory) -> Path:
    """The models folder of the test server; tests link the files they need before it starts."""
    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("models/checkpoints", "models/layer_model", "custom_nodes", "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return base


@pytest.fixture(scope="session")
def comfy_server(server_models: Path, synth_weights) -> ComfyServer:
    """A live ComfyUI (--cpu) with this pack, a synthetic SD1.5 checkpoint and synthetic
    transparent VAE files for SD15 and SDXL in a temporary base directory."""
    comfy, reason = find_comfyui()
    if comfy is None:
        pytest.skip(reason)
    base = server_models
    (base / "custom_nodes" / PACK_ROOT.name).symlink_to(PACK_ROOT, target_is_directory=True)
    (base / "models" / "checkpoints" / "sd15_synthetic.safetensors").symlink_to(synth_weights("sd15_checkpoint"))
    for stem in ("vae_transparent_decoder", "vae_transparent_encoder",
                 "layer_sd15_vae_transparent_decoder", "layer_sd15_vae_transparent_encoder"):
        source = synth_weights(stem)
        (base / "models" / "layer_model" / source.name).symlink_to(source)
    port = _free_port()
    log = base / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(comfy / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", "--disable-api-nodes"]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=str(comfy), stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, process, log)
    deadline = time.time() + SERVER_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail("ComfyUI exited during start-up:\n" + log.read_text()[-5000:])
        try:
            server.get("/system_stats")
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.time() > deadline:
                process.kill()
                pytest.fail("ComfyUI did not start in time:\n" + log.read_text()[-5000:])
            time.sleep(1)
    yield server
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
