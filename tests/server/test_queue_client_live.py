"""workflows/queue_workflow.py, the command-line client, run as users run it (a subprocess)
against the live server: success, unreachable server, rejected prompts, execution errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from support.client import run_client
from support.paths import API_DIR
from support.workflow_runs import size_mismatch_prompt
from support.workflows import load_api

TEST_CHECKPOINT = "sd15_synthetic.safetensors"


def _queue(server, tmp_path, workflow: dict):
    """The client run on `workflow`, written to a file as users have it."""
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    return run_client(str(path), "--server", server.url, "--output-dir", str(tmp_path / "out"))


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
    workflow["10"]["class_type"] = "OtherPackNode"
    result = _queue(comfy_server, tmp_path, workflow)
    assert result.returncode == 3, result.stderr
    assert "rejected" in result.stderr
    # Every node type the server lacks is named, also where the server names only the first (0.33).
    assert "not installed in this ComfyUI: LayeredDiffusionNoSuchNode, OtherPackNode." in result.stderr


def test_bad_value_is_rejected(comfy_server, tmp_path):
    result = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--server", comfy_server.url,
                        "--set", f"CheckpointLoaderSimple.ckpt_name={TEST_CHECKPOINT}",
                        "--set", "LayeredDiffusionDecodeRGBA.sd_version=SD3", "--output-dir", str(tmp_path))
    assert result.returncode == 3, result.stderr
    assert re.search(r"node 7 \(Layer Diffuse Decode \(RGBA\)\): .*sd_version.*SD3", result.stderr), result.stderr


def test_execution_error(comfy_server, tmp_path):
    result = _queue(comfy_server, tmp_path, size_mismatch_prompt("client_error"))
    assert result.returncode == 4, result.stderr
    assert "execution failed in node 3 (LayeredDiffusionDecodeRGBA)" in result.stderr
    assert "size mismatch" in result.stderr


def test_a_missing_checkpoint_says_where_to_get_it_or_how_to_use_your_own(comfy_server, tmp_path):
    """The shipped workflow names a checkpoint the server does not have: the rejection gives its
    download link and folder (from the UI twin's models list) and the --set that uses another."""
    result = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--server", comfy_server.url,
                        "--output-dir", str(tmp_path))
    assert result.returncode == 3, result.stderr
    assert ("v1-5-pruned-emaonly-fp16.safetensors: download https://huggingface.co/" in result.stderr
            and "into ComfyUI/models/checkpoints/" in result.stderr), result.stderr
    assert "--set CheckpointLoaderSimple.ckpt_name=<file name>" in result.stderr


def test_every_missing_layerdiffuse_file_is_named_in_one_answer(comfy_server, tmp_path):
    """With downloads off (the test server runs with HF_HUB_OFFLINE=1), a prompt that needs several
    LayerDiffuse files the server lacks is rejected once, naming each file with its link."""
    workflow = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "2": {"class_type": "LayeredDiffusionApply",
              "inputs": {"model": ["1", 0], "config": "SDXL, Conv Injection", "weight": 1.0}},
        "3": {"class_type": "LayeredDiffusionApply",
              "inputs": {"model": ["2", 0], "config": "SDXL, Attention Injection", "weight": 1.0}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": ["5", 0],
                                                   "negative": ["5", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "missing"}},
    }
    result = _queue(comfy_server, tmp_path, workflow)
    assert result.returncode == 3, result.stderr
    # Files no other test gives this server.
    for name in ("layer_xl_transparent_conv.safetensors", "layer_xl_transparent_attn.safetensors"):
        assert f"{name} is not in" in result.stderr, result.stderr
        assert f"https://huggingface.co/LayerDiffusion/layerdiffusion-v1/resolve/main/{name}" in result.stderr

