"""The Flux nodes on a live ComfyUI server: /object_info, the shipped workflows through /prompt's
validation, prompts that decode and encode and save RGBA PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.images import rgba_disc, save_rgba_png
from support.server import assert_success, link_into
from support.synth import synthetic_file
from support.workflows import load_api

WORKFLOWS = ["flux_transparent_t2i", "flux_transparent_img2img"]


@pytest.fixture(scope="module")
def flux_server(comfy_server):
    """The live server with synthetic LayerDiffuse-Flux files and empty stand-ins for the FLUX.1-dev files
    (enough for /prompt's validation; loading them fails, as it should)."""
    base = comfy_server.base
    link_into(base, "layer_model", synthetic_file("flux_transparent_vae"))
    link_into(base, "layer_model", synthetic_file("flux_layerlora"))
    for folder, names in (("diffusion_models", ["flux1-dev.safetensors"]),
                          ("text_encoders", ["clip_l.safetensors", "t5xxl_fp16.safetensors"])):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        for file_name in names:
            (base / "models" / folder / file_name).touch()
    save_rgba_png(rgba_disc(64, 64), base / "input" / "transparent_input.png")
    return comfy_server


def test_object_info_lists_the_flux_nodes(flux_server):
    info = flux_server.get("/object_info")
    assert info["LayeredDiffusionFluxDecode"]["input_order"] == {
        "required": ["samples", "vae", "sub_batch_size"], "optional": ["passes", "precision"]}
    assert info["LayeredDiffusionFluxDecode"]["output"] == ["IMAGE", "MASK"]
    assert info["LayeredDiffusionFluxEncode"]["input_order"] == {"required": ["vae", "image"], "optional": ["mask"]}
    assert info["LayeredDiffusionFluxApply"]["output"] == ["MODEL"]
    assert info["LayeredDiffusionFluxVAELoader"]["output"] == ["VAE"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_workflows_pass_the_servers_validation(flux_server, name):
    """/prompt accepts the shipped workflows as they are; they then fail only where the
    stand-in FLUX.1-dev files are loaded."""
    entry = flux_server.run(load_api(name))
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] in ("UNETLoader", "DualCLIPLoader"), errors


def _assert_rgba_png(path: Path, size):
    with Image.open(path) as png:
        assert png.mode == "RGBA" and png.size == size
        alpha = np.asarray(png.getchannel("A"))
        assert alpha.min() < alpha.max()


def test_flux_decode_and_encode_prompts_save_rgba_pngs(flux_server):
    prompt = {
        "vae": {"class_type": "LayeredDiffusionFluxVAELoader", "inputs": {}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "decode": {"class_type": "LayeredDiffusionFluxDecode",
                   "inputs": {"samples": ["latent", 0], "vae": ["vae", 0], "sub_batch_size": 2, "passes": "8",
                              "precision": "auto"}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "flux_t2i"}},
        "load": {"class_type": "LoadImage", "inputs": {"image": "transparent_input.png"}},
        "encode": {"class_type": "LayeredDiffusionFluxEncode",
                   "inputs": {"vae": ["vae", 0], "image": ["load", 0], "mask": ["load", 1]}},
        "decode_again": {"class_type": "LayeredDiffusionFluxDecode",
                         "inputs": {"samples": ["encode", 0], "vae": ["vae", 0], "sub_batch_size": 4, "passes": "4",
                                    "precision": "auto"}},
        "save_again": {"class_type": "SaveImage", "inputs": {"images": ["decode_again", 0], "filename_prefix": "flux_i2i"}},
    }
    entry = flux_server.run(prompt)
    assert_success(entry)
    files = flux_server.output_files(entry, "save")
    assert len(files) == 2
    for path in files:
        with Image.open(path) as png:
            assert png.mode == "RGBA" and png.size == (64, 64)
    (round_trip,) = flux_server.output_files(entry, "save_again")
    _assert_rgba_png(round_trip, (64, 64))
