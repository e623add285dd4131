"""workflows/queue_workflow.py, the stdlib-only client, without a server: only the standard
library, arguments and UI-format files refused before queueing, an unreachable server, the
overrides on every shipped workflow, websocket framing."""
from __future__ import annotations

import ast
import json
import socket
import sys
from pathlib import Path

import pytest

from support.client import CLIENT, client_module, run_client
from support.net import free_port
from support.paths import API_DIR, PACK_ROOT, WORKFLOW_DIR
from support.workflows import api_workflow_names, load_api


def test_the_client_imports_only_the_standard_library():
    tree = ast.parse(CLIENT.read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert modules - {"__future__"} <= set(sys.stdlib_module_names), modules - set(sys.stdlib_module_names)


def test_unreachable_server(tmp_path):
    result = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--server", f"http://127.0.0.1:{free_port()}",
                        "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert "cannot reach ComfyUI at http://127.0.0.1:" in result.stderr and "Is it running?" in result.stderr
    assert not any(tmp_path.iterdir())


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


@pytest.mark.parametrize("name", [n for n in api_workflow_names() if n.startswith(("sd15_", "sdxl_", "flux_"))])
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
    shipped = load_api(name)
    for node_id, node in workflow.items():
        if isinstance(shipped[node_id]["inputs"].get("width"), list):  # linked to the one size: follows it
            assert node["inputs"]["width"] == shipped[node_id]["inputs"]["width"]
        elif node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage", "ImageScale"):
            assert (node["inputs"]["width"], node["inputs"]["height"]) == (256, 256)
        elif node["class_type"] == "LayeredDiffusionUpscaleRGBA":  # a fixed size follows, 0 (scale_by) stays
            before = shipped[node_id]["inputs"]
            assert node["inputs"]["width"] == (256 if before["width"] else 0)


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


def test_default_output_folder_is_outside_the_pack():
    output = Path(client_module().parse_args(["workflow.json"]).output_dir).resolve()
    assert PACK_ROOT not in output.parents and output != PACK_ROOT
    assert output == (Path.home() / "layerdiffuse_output").resolve()


def test_model_links_come_from_the_ui_twin(tmp_path):
    downloads = client_module().model_downloads(str(API_DIR / "sd15_transparent_fg_attn.json"))
    checkpoint = downloads["v1-5-pruned-emaonly-fp16.safetensors"]
    assert checkpoint["directory"] == "checkpoints" and checkpoint["url"].startswith("https://huggingface.co/")
    assert downloads["layer_sd15_transparent_attn.safetensors"]["directory"] == "layer_model"
    assert client_module().model_downloads(str(tmp_path / "nowhere.json")) == {}
