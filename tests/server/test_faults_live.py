"""Faults through a live ComfyUI server: an interrupted decode leaves nothing behind. Every output is compared with the same prompt run alone on a server that never saw a fault
(`references`, started and stopped first: one server at a time)."""
from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
from PIL import Image

from support.environment import find_comfyui, unavailable
from support.live_queue import cached_nodes, open_websocket, queue, saved_pixels
from support.server import ComfyServer, ServerError, link_into, make_base, start
from support.synth import synthetic_file
from support.workflow_runs import write_inputs

CHECKPOINT = "sd15_synthetic.safetensors"
LAYER_FILES = ("layer_sd15_vae_transparent_decoder", "layer_sd15_vae_transparent_encoder",
               "layer_sd15_transparent_attn", "layer_sd15_joint", "layer_sd15_fg2bg", "layer_sd15_bg2fg")
# The interrupted decode: big enough that one pass takes a while on a CPU.
DECODE_SIZE = 192
DECODE_INPUT = "fault_decode_input.png"


def decode_prompt() -> dict:
    """An RGB PNG, VAE-encoded, decoded again with alpha through the 8-pass transparent decode."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "load": {"class_type": "LoadImage", "inputs": {"image": DECODE_INPUT}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ckpt", 2]}},
        "decode": {"class_type": "LayeredDiffusionDecodeRGBA",
                   "inputs": {"samples": ["encode", 0], "images": ["load", 0], "sd_version": "SD15",
                              "sub_batch_size": 16, "passes": "8", "precision": "auto"}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "fault_decode"}},
    }


def _write_decode_input(folder) -> None:
    y, x = np.mgrid[0:DECODE_SIZE, 0:DECODE_SIZE] / (DECODE_SIZE - 1)
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.12).astype(np.float64)
    Image.fromarray((np.dstack([x, y * disc, 1 - x * y]) * 255).astype(np.uint8), "RGB").save(folder / DECODE_INPUT)


def _start_server(tmp_path_factory, name: str) -> ComfyServer:
    comfy, reason = find_comfyui()
    if comfy is None:
        unavailable(reason)
    base = make_base(tmp_path_factory.mktemp(name))
    link_into(base, "checkpoints", synthetic_file("sd15_checkpoint"), CHECKPOINT)
    for stem in LAYER_FILES:
        link_into(base, "layer_model", synthetic_file(stem))
    write_inputs(base / "input")
    _write_decode_input(base / "input")
    try:
        return start(comfy, base)
    except ServerError as error:
        pytest.fail(str(error))


def _succeeded(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    return entry


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """What each prompt of this module saves when run alone on a server that sees no fault: the
    decode first, on the freshly started server, then the others one by one."""
    server = _start_server(tmp_path_factory, "fault_reference")
    try:
        runs = {"decode": decode_prompt()}
        yield {key: saved_pixels(server, _succeeded(server.run(prompt))) for key, prompt in runs.items()}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def faulted(references, tmp_path_factory) -> ComfyServer:
    """The server the faults happen on, started once the reference server has stopped."""
    server = _start_server(tmp_path_factory, "fault_server")
    yield server
    server.stop()


def _assert_same_outputs(saved: dict, reference: dict, what: str) -> None:
    assert saved and sorted(saved) == sorted(reference), (what, sorted(saved), sorted(reference))
    for key, pixels in saved.items():
        assert pixels.shape == reference[key].shape and np.array_equal(pixels, reference[key]), (
            f"{what}: output {key} differs from the same prompt run alone on a server without faults "
            f"(max difference {np.abs(pixels.astype(int) - reference[key].astype(int)).max()})")


def _follow_and_interrupt(server: ComfyServer, prompt: dict, node_id: str) -> tuple[str, list, float, float]:
    """Queue `prompt`, POST /interrupt once `node_id` has reported its first progress step, and follow
    the prompt to its end: (how it ended, [(time, value)] of the node's progress, when the interrupt
    was sent, when the end was reported)."""
    websocket, client_id = open_websocket(server)
    try:
        prompt_id = queue(server, prompt, client_id)
        progress, interrupted_at, deadline = [], None, time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                text = websocket.receive()
            except socket.timeout:
                continue
            if text is None:
                continue
            message = json.loads(text)
            kind, data = message.get("type"), message.get("data") or {}
            if kind == "progress" and data.get("prompt_id") == prompt_id and str(data.get("node")) == node_id:
                progress.append((time.monotonic(), data["value"]))
                if interrupted_at is None:
                    status, _ = server.post("/interrupt", {})
                    assert status == 200
                    interrupted_at = time.monotonic()
            if kind in ("execution_interrupted", "execution_success", "execution_error") and \
                    data.get("prompt_id") == prompt_id:
                return kind, progress, interrupted_at, time.monotonic()
        raise TimeoutError("the interrupted prompt did not end")
    finally:
        websocket.close()


def test_an_interrupted_decode_stops_within_a_pass_and_leaves_nothing_behind(faulted, references):
    kind, progress, interrupted_at, ended_at = _follow_and_interrupt(faulted, decode_prompt(), "decode")
    assert kind == "execution_interrupted", (kind, progress)
    values = [value for _, value in progress]
    # The pass running when the interrupt came may still report; no pass after it starts.
    after = [value for at, value in progress if at > interrupted_at]
    assert len(after) <= 1 and max(values) < 8, (values, after)
    passes = [b - a for (a, _), (b, _) in zip(progress, progress[1:])]
    print(f"interrupt honoured {ended_at - interrupted_at:.2f}s after it was sent; passes took {passes}")

    entry = _succeeded(faulted.run(decode_prompt()))
    assert "decode" not in cached_nodes(entry)
    _assert_same_outputs(saved_pixels(faulted, entry), references["decode"], "the decode after an interrupt")
