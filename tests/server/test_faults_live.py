"""Faults through a live ComfyUI server: an interrupted decode, failed prompts and a full queue of
mixed SD1.5 modes leave nothing behind. Every output is compared with the same prompt run alone
on a server that never saw a fault (`references`, started and stopped first: one server at a
time), and the faulted server's memory does not grow from prompt to prompt."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from support.client import client_module
from support.environment import find_comfyui, unavailable
from support.live_queue import cached_nodes, idle_rss, open_websocket, queue, saved_pixels, wait_all
from support.server import ComfyServer, ServerError, assert_success, link_into, make_base, start
from support.synth import synthetic_file
from support.workflow_runs import size_mismatch_prompt, tiny, write_inputs
from support.workflows import load_api

CHECKPOINT = "sd15_synthetic.safetensors"
LAYER_FILES = ("layer_sd15_vae_transparent_decoder", "layer_sd15_vae_transparent_encoder",
               "layer_sd15_transparent_attn", "layer_sd15_joint", "layer_sd15_fg2bg", "layer_sd15_bg2fg")
# The mixed queue: SD1.5 foreground (attention), joint fg/bg/blend with Save Layers, cond fg->bg
# (Upscale RGBA, Save Layers) and bg->fg, encode + img2img, hires fix (Upscale RGBA + Encode).
MODES = ("sd15_transparent_fg_attn", "sd15_joint_fg_bg_blend", "sd15_cond_joint_fg_to_bg",
         "sd15_cond_joint_bg_to_fg", "sd15_transparent_img2img", "sd15_transparent_hires_fix")
QUEUED = 40
FIRST_BURST = 10
RSS_GROWTH = 1.10
AFTER_FAILURE = "sd15_joint_fg_bg_blend"
# The interrupted decode: big enough that one pass takes a while on a CPU.
DECODE_SIZE = 192
DECODE_INPUT = "fault_decode_input.png"


def mode_prompt(name: str, variant: int = 0) -> dict:
    """A shipped SD1.5 workflow at the tiny test size with one step and one decoder pass (the 8-pass
    decode is the interrupt test's). Variants differ only by trailing spaces in the prompt texts:
    CLIP's tokenizer drops them, so the images are the same, but ComfyUI's cache, which keys on the
    inputs, cannot serve one variant for another and every node from the text encoders on runs."""
    prompt = tiny(load_api(name), CHECKPOINT)
    for node in prompt.values():
        if "passes" in node["inputs"]:
            node["inputs"]["passes"] = "1"
        if node["class_type"] == "CLIPTextEncode":
            node["inputs"]["text"] += " " * variant
    return prompt


def queued_modes() -> list[tuple[str, int]]:
    """(workflow, variant) of each queued prompt: the modes in turn, no two neighbours alike."""
    return [(MODES[i % len(MODES)], i // len(MODES)) for i in range(QUEUED)]


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


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """What each prompt of this module saves when run alone on a server that sees no fault: the
    decode first, on the freshly started server, then the others one by one."""
    server = _start_server(tmp_path_factory, "fault_reference")
    try:
        runs = {"decode": decode_prompt(), **{name: mode_prompt(name) for name in MODES}}
        yield {key: saved_pixels(server, assert_success(server.run(prompt))) for key, prompt in runs.items()}
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
            except TimeoutError:
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

    entry = assert_success(faulted.run(decode_prompt()))
    assert "decode" not in cached_nodes(entry)
    _assert_same_outputs(saved_pixels(faulted, entry), references["decode"], "the decode after an interrupt")


def test_failed_prompts_are_followed_by_a_prompt_with_the_fresh_output(faulted, references):
    # Bad input to a node of the pack: an execution error, the server goes on.
    entry = faulted.run(size_mismatch_prompt("fault_mismatch"))
    assert entry["status"]["status_str"] == "error"
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert errors and errors[0]["exception_type"] == "layerdiffuse.InputError", errors

    # A failure in the middle of sampling, with the joint mode's attention sharing on the model.
    after_queue = QUEUED // len(MODES) + 1  # a variant the queue test does not run
    wrong_batch = mode_prompt(AFTER_FAILURE, after_queue)
    client_module().apply_overrides(wrong_batch, sets=["EmptyLatentImage.batch_size=2"])
    entry = faulted.run(wrong_batch)
    assert entry["status"]["status_str"] == "error"
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert errors and "multiple of 3" in errors[0]["exception_message"], errors

    # A combo value the node does not offer: refused before it is queued.
    bad_combo = mode_prompt(AFTER_FAILURE, after_queue)
    for node in bad_combo.values():
        if node["class_type"] == "LayeredDiffusionJointApply":
            node["inputs"]["config"] = "SD15, no such mode"
    status, body = faulted.post("/prompt", {"prompt": bad_combo})
    assert status == 400 and body.get("node_errors"), body

    entry = assert_success(faulted.run(mode_prompt(AFTER_FAILURE, after_queue)))
    _assert_same_outputs(saved_pixels(faulted, entry), references[AFTER_FAILURE], "the prompt after failures")


def test_a_full_queue_of_mixed_modes_matches_the_prompts_run_alone_without_growing_memory(faulted, references):
    runs = queued_modes()
    prompts = [mode_prompt(name, variant) for name, variant in runs]
    started = time.monotonic()
    first = [queue(faulted, prompt) for prompt in prompts[:FIRST_BURST]]
    entries = wait_all(faulted, first)
    rss_first = idle_rss(faulted)
    rest = [queue(faulted, prompt) for prompt in prompts[FIRST_BURST:]]
    entries += wait_all(faulted, rest)
    rss_all = idle_rss(faulted)
    print(f"{len(prompts)} prompts in {time.monotonic() - started:.0f}s; server RSS after {FIRST_BURST}: "
          f"{rss_first / 2**30:.2f} GiB, after {len(prompts)}: {rss_all / 2**30:.2f} GiB")

    for (name, variant), prompt, entry in zip(runs, prompts, entries):
        assert_success(entry)
        samplers = {n for n, node in prompt.items() if node["class_type"] == "KSampler"}
        assert not samplers & cached_nodes(entry), f"{name} variant {variant} was served from the cache"
        _assert_same_outputs(saved_pixels(faulted, entry), references[name], f"{name} variant {variant}")
    assert rss_all <= RSS_GROWTH * rss_first, (rss_first, rss_all)
    assert faulted.get("/system_stats")
