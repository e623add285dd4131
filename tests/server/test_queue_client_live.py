"""workflows/queue_workflow.py, the stdlib-only client, run as users run it (a subprocess)
against the live server: success, unreachable server, rejected prompts, execution errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from support.client import run_client
from support.paths import API_DIR
from support.workflows import load_api

TEST_CHECKPOINT = "sd15_synthetic.safetensors"


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








