"""workflows/queue_workflow.py, the stdlib-only client, run as users run it (a subprocess)
against the live server: success, unreachable server, rejected prompts, execution errors."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from workflow_helpers import API_DIR, WORKFLOW_DIR, api_workflow_names, load_api

CLIENT = WORKFLOW_DIR / "queue_workflow.py"
TEST_CHECKPOINT = "sd15_synthetic.safetensors"


def client_module():
    spec = importlib.util.spec_from_file_location("queue_workflow", CLIENT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_client(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # -I: isolated mode, so nothing from the test environment's site-packages is importable by accident
    return subprocess.run([sys.executable, "-I", str(CLIENT), *args], capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_client_imports_only_the_standard_library():
    tree = ast.parse(CLIENT.read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert modules - {"__future__"} <= set(sys.stdlib_module_names), modules - set(sys.stdlib_module_names)


def test_queue_follow_and_download(comfy_server, tmp_path):
    out = tmp_path / "out"
    result = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--server", comfy_server.url,
                        "--prompt", "a red apple", "--negative", "blurry", "--seed", "4242",
                        "--width", "64", "--height", "48", "--batch", "2",
                        "--set", f"CheckpointLoaderSimple.ckpt_name={TEST_CHECKPOINT}", "--set", "KSampler.steps=2",
                        "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    saved = [Path(line) for line in result.stdout.splitlines()]
    assert len(saved) == 2 and all(p.parent == out for p in saved)
    for path in saved:
        with Image.open(path) as png:
            assert png.mode == "RGBA" and png.size == (64, 48)
    # Progress came over the websocket: the sampler's steps and the decoder's passes.
    assert re.search(r"node 5: 2/2", result.stderr), result.stderr
    assert "running node 7" in result.stderr
    prompt_id = re.search(r"queued prompt (\S+)", result.stderr).group(1)
    queued = comfy_server.get(f"/history/{prompt_id}")[prompt_id]["prompt"][2]
    assert queued["2"]["inputs"]["text"] == "a red apple" and queued["3"]["inputs"]["text"] == "blurry"
    assert queued["5"]["inputs"]["seed"] == 4242 and queued["5"]["inputs"]["steps"] == 2
    assert queued["4"]["inputs"] == {"width": 64, "height": 48, "batch_size": 2}


def test_previews_are_downloaded_on_request(comfy_server, tmp_path):
    result = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--server", comfy_server.url, "--previews",
                        "--width", "64", "--height", "64", "--set", f"CheckpointLoaderSimple.ckpt_name={TEST_CHECKPOINT}",
                        "--set", "KSampler.steps=1", "--output-dir", str(tmp_path), "--quiet")
    assert result.returncode == 0, result.stderr
    saved = result.stdout.split()
    assert len(saved) == 2 and any("layerdiffuse" in Path(p).name for p in saved)
    assert result.stderr == ""


def test_unreachable_server(tmp_path):
    result = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--server", f"http://127.0.0.1:{_free_port()}",
                        "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert "cannot reach ComfyUI at http://127.0.0.1:" in result.stderr and "Is it running?" in result.stderr
    assert not any(tmp_path.iterdir())


def test_missing_node_is_rejected(comfy_server, tmp_path):
    workflow = load_api("sd15_transparent_decode")
    workflow["9"]["class_type"] = "LayeredDiffusionNoSuchNode"
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(workflow))
    result = run_client(str(path), "--server", comfy_server.url, "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 3, result.stderr
    assert "rejected" in result.stderr and "LayeredDiffusionNoSuchNode" in result.stderr
    assert "not installed" in result.stderr


def test_bad_value_is_rejected(comfy_server, tmp_path):
    result = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--server", comfy_server.url,
                        "--set", f"CheckpointLoaderSimple.ckpt_name={TEST_CHECKPOINT}",
                        "--set", "LayeredDiffusionDecodeRGBA.sd_version=SD3", "--output-dir", str(tmp_path))
    assert result.returncode == 3, result.stderr
    assert re.search(r"node 7 \(Layer Diffuse Decode \(RGBA\)\): Value not in list.*sd_version.*SD3", result.stderr), \
        result.stderr


def test_execution_error(comfy_server, tmp_path):
    workflow = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 64, "batch_size": 1, "color": 0}},
        "3": {"class_type": "LayeredDiffusionDecodeRGBA",
              "inputs": {"samples": ["1", 0], "images": ["2", 0], "sd_version": "SD15", "sub_batch_size": 1}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "client_error"}},
    }
    path = tmp_path / "fails.json"
    path.write_text(json.dumps(workflow))
    result = run_client(str(path), "--server", comfy_server.url, "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 4, result.stderr
    assert "execution failed in node 3 (LayeredDiffusionDecodeRGBA)" in result.stderr
    assert "size mismatch" in result.stderr


def test_ui_format_and_bad_arguments_are_refused_before_queueing(tmp_path):
    ui = run_client(str(WORKFLOW_DIR / "sd15_transparent_decode.json"), "--server", "http://127.0.0.1:9")
    assert ui.returncode == 1 and "UI-format workflow" in ui.stderr and "workflows/api/" in ui.stderr
    width = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--width", "100")
    assert width.returncode == 1 and "multiple of 8" in width.stderr
    joint = run_client(str(API_DIR / "sd15_joint_fg_bg_blend.json"), "--batch", "4")
    assert joint.returncode == 1 and "multiple of 3" in joint.stderr
    typo = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--set", "KSampler.stepz=3")
    assert typo.returncode == 1 and "has no input 'stepz'" in typo.stderr
    missing = run_client(str(tmp_path / "nope.json"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def _text_behind(module, workflow: dict, side: str) -> set[str]:
    return {workflow[module._text_node_behind(workflow, node["inputs"][side])]["inputs"]["text"]
            for node in workflow.values() if side in node["inputs"] and node["class_type"].startswith("KSampler")}


@pytest.mark.parametrize("name", api_workflow_names())
def test_overrides_reach_every_shipped_workflow(name):
    module = client_module()
    workflow = load_api(name)
    has_negative = bool(module.prompt_nodes(workflow, "negative"))
    sized = any("width" in n["inputs"] for n in workflow.values())
    batched = any("batch_size" in n["inputs"] for n in workflow.values())
    module.apply_overrides(workflow, prompt="P", negative="N" if has_negative else None, seed=99,
                           width=256 if sized else None, height=256 if sized else None, batch=6 if batched else None)
    assert _text_behind(module, workflow, "positive") == {"P"}
    if has_negative:
        assert _text_behind(module, workflow, "negative") == {"N"}
    seeds = [n["inputs"].get("seed", n["inputs"].get("noise_seed")) for n in workflow.values()
             if n["class_type"].startswith("KSampler")]
    assert seeds and set(seeds) == {99}
    for node in workflow.values():
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage", "ImageScale"):
            assert (node["inputs"]["width"], node["inputs"]["height"]) == (256, 256)


def test_websocket_frames_survive_timeouts_and_fragmentation():
    """A message split across reads and frames (as a busy server sends it) arrives whole."""
    module = client_module()
    ours, theirs = socket.socketpair()
    try:
        ws = module.WebSocket.__new__(module.WebSocket)
        ws.sock, ws.buffer, ws.message, ws.text = ours, b"", b"", True
        ours.settimeout(0.2)
        text = json.dumps({"type": "progress", "data": {"value": 1, "max": 2}}).encode() * 10
        first = bytes([0x01, 126]) + (200).to_bytes(2, "big") + text[:200]      # text, not final
        rest = bytes([0x80, 126]) + (len(text) - 200).to_bytes(2, "big") + text[200:]  # continuation, final
        theirs.sendall(first[:3])
        with pytest.raises(socket.timeout):
            ws.receive()
        theirs.sendall(first[3:] + bytes([0x89, 0]) + rest[:50])  # a ping in between
        with pytest.raises(socket.timeout):
            ws.receive()
        assert theirs.recv(16)[:1] == bytes([0x8A])  # answered with a pong
        theirs.sendall(rest[50:] + bytes([0x82, 3]) + b"png")
        assert ws.receive() == text.decode()
        assert ws.receive() is None  # binary (a preview image)
    finally:
        ours.close()
        theirs.close()
