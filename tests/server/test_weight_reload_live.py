"""A weight file replaced on disk while the server runs: the same prompt queued again decodes with
the new file, exactly as a server started with the new file does."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.environment import find_comfyui, unavailable
from support.images import rgba_disc, save_rgba_png
from support.server import ComfyServer, ServerError, assert_success, link_into, make_base, start
from support.synth import synthetic_file

DECODER = "layer_sd15_vae_transparent_decoder"

PROMPT = {
    "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15_synthetic.safetensors"}},
    "load": {"class_type": "LoadImage", "inputs": {"image": "disc.png"}},
    "encode": {"class_type": "LayeredDiffusionEncode",
               "inputs": {"vae": ["ckpt", 2], "image": ["load", 0], "mask": ["load", 1], "sd_version": "SD15"}},
    "vae_decode": {"class_type": "VAEDecode", "inputs": {"samples": ["encode", 0], "vae": ["ckpt", 2]}},
    "rgba": {"class_type": "LayeredDiffusionDecodeRGBA",
             "inputs": {"samples": ["encode", 0], "images": ["vae_decode", 0], "sd_version": "SD15",
                        "sub_batch_size": 1, "passes": "1"}},
    "save": {"class_type": "SaveImage", "inputs": {"images": ["rgba", 0], "filename_prefix": "reload"}},
}


def _base(root: Path, decoder_seed: int) -> Path:
    """A server base directory: the SD1.5 checkpoint, the SD1.5 encoder, the decoder of `decoder_seed`."""
    base = make_base(root)
    link_into(base, "checkpoints", synthetic_file("sd15_checkpoint"), "sd15_synthetic.safetensors")
    link_into(base, "layer_model", synthetic_file("layer_sd15_vae_transparent_encoder"))
    decoder = synthetic_file(DECODER, seed=decoder_seed)
    link_into(base, "layer_model", decoder, decoder.name)
    save_rgba_png(rgba_disc(64, 96), base / "input" / "disc.png")
    return base


def _decoded(server: ComfyServer) -> np.ndarray:
    entry = server.run(PROMPT)
    assert_success(entry)
    (path,) = server.output_files(entry, "save")
    with Image.open(path) as png:
        return np.asarray(png).copy()


@pytest.fixture()
def comfy():
    path, reason = find_comfyui()
    if path is None:
        unavailable(reason)
    return path


def _serving(comfy: Path, base: Path) -> ComfyServer:
    try:
        return start(comfy, base)
    except ServerError as error:
        pytest.fail(str(error))


def test_replaced_decoder_is_used_by_the_next_prompt(comfy, tmp_path):
    base = _base(tmp_path / "running", decoder_seed=0)
    server = _serving(comfy, base)
    try:
        before = _decoded(server)
        link = base / "models" / "layer_model" / synthetic_file(DECODER).name
        os.symlink(synthetic_file(DECODER, seed=1), f"{link}.new")
        os.replace(f"{link}.new", link)
        after = _decoded(server)
    finally:
        server.stop()
    assert not np.array_equal(after, before)

    fresh = _serving(comfy, _base(tmp_path / "fresh", decoder_seed=1))
    try:
        assert np.array_equal(_decoded(fresh), after)
    finally:
        fresh.stop()
