"""Every shipped SDXL workflow runs to RGBA results on a live ComfyUI server, at a tiny size, on a
synthetic SDXL checkpoint loaded in half precision (--fp16-unet --fp16-text-enc: about 7 GB
instead of 14 GB in float32) and reduced synthetic LayerDiffuse files that keep the official file
names and key names (every key of the full files is mapped onto the SDXL UNet in-process, in
host/test_apply.py)."""
from __future__ import annotations

import pytest
import torch

from support.environment import find_comfyui, unavailable
from support.server import ComfyServer, ServerError, assert_success, link_into, make_base, start
from support.synth import manifest, synthetic_file, synthweights
from support.workflow_runs import assert_saved_as_expected, at_size, tiny, write_inputs
from support.workflows import api_workflow_names, load_api, node_types, require_registered

pytestmark = pytest.mark.sdxl

SDXL_RUNS = [n for n in api_workflow_names() if n.startswith("sdxl_")]
CHECKPOINT = "sdxl_synthetic.safetensors"
CHANGED_SIZE = (96, 64)  # width, height, as in test_workflows_live.py
PATCH_FILES = ("layer_xl_transparent_attn", "layer_xl_transparent_conv", "layer_xl_fg2ble", "layer_xl_bg2ble",
               "layer_xl_fgble2bg", "layer_xl_bgble2fg")
# Which entries of each official layout the reduced files keep (the input conv, which the layer
# modes widen, a down block, the middle block's attention, an up block and the output).
KEPT = ("input_blocks.0.0.", "input_blocks.1.0.", "middle_block.1.transformer_blocks.0.", "output_blocks.8.0.",
        "output_blocks.2.1.transformer_blocks.0.", "out.")


def reduced_patch_file(stem: str, folder) -> None:
    from safetensors.torch import save_file

    layout = manifest(stem)
    tensors = {k: torch.from_numpy(synthweights().tensor_values(k, v["shape"])).half()
               for k, v in layout["tensors"].items() if k.removeprefix("diffusion_model.").startswith(KEPT)}
    assert tensors, stem
    save_file(tensors, str(folder / layout["file"]))


@pytest.fixture(scope="module")
def sdxl_server(comfy_server, tmp_path_factory) -> ComfyServer:
    """A second live server for SDXL, with the SD1.5 server's models unloaded first to make room."""
    comfy, reason = find_comfyui()
    if comfy is None:
        unavailable(reason)
    comfy_server.post("/free", {"unload_models": True, "free_memory": True})
    base = make_base(tmp_path_factory.mktemp("sdxl_base"))
    link_into(base, "checkpoints", synthetic_file("sdxl_checkpoint"), CHECKPOINT)
    for stem in ("vae_transparent_decoder", "vae_transparent_encoder"):
        link_into(base, "layer_model", synthetic_file(stem))
    for stem in PATCH_FILES:
        reduced_patch_file(stem, base / "models" / "layer_model")
    write_inputs(base / "input")
    write_inputs(base / "input", CHANGED_SIZE)
    try:
        server = start(comfy, base, ["--fp16-unet", "--fp16-text-enc"])
    except ServerError as error:
        pytest.fail(str(error))
    yield server
    server.stop()


def test_every_sdxl_mode_has_a_workflow_here():
    assert len(SDXL_RUNS) >= 7


@pytest.mark.parametrize("name", SDXL_RUNS)
def test_sdxl_api_workflow_runs_end_to_end(sdxl_server, name):
    prompt = load_api(name)
    require_registered(sdxl_server.get("/object_info"), node_types(prompt))
    entry = sdxl_server.run(tiny(prompt, CHECKPOINT), timeout_s=1200)
    assert_success(entry)
    assert_saved_as_expected(sdxl_server, prompt, entry)


@pytest.mark.parametrize("name", SDXL_RUNS)
def test_sdxl_api_workflow_runs_at_a_changed_size(sdxl_server, name):
    """The size changed in its one place (or the input images') is the size of every output."""
    prompt = at_size(tiny(load_api(name), CHECKPOINT), CHANGED_SIZE)
    entry = sdxl_server.run(prompt, timeout_s=1200)
    assert_success(entry)
    assert_saved_as_expected(sdxl_server, prompt, entry, made_at=CHANGED_SIZE)
