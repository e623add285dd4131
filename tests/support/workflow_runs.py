"""Running the shipped API workflows on a live server at a tiny size, and what they must save."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .client import client_module
from .server import ComfyServer
from .workflows import DECODERS

TINY = 64
# Test inputs named like the shipped workflows' Load Image values.
INPUT_IMAGES = ("layerdiffuse_fg.png", "layerdiffuse_bg.png", "layerdiffuse_blend.png")


def write_inputs(folder: Path) -> None:
    """The Load Image files the shipped workflows name: a transparent foreground, a background and
    a blend, TINY pixels square."""
    y, x = np.mgrid[0:TINY, 0:TINY] / (TINY - 1)
    rgb = np.stack([x, y, 1 - x], axis=-1)
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).astype(np.float64)
    Image.fromarray((np.dstack([rgb, disc]) * 255).astype(np.uint8), "RGBA").save(folder / INPUT_IMAGES[0])
    Image.fromarray((np.dstack([y, y, x]) * 255).astype(np.uint8), "RGB").save(folder / INPUT_IMAGES[1])
    Image.fromarray((np.dstack([x * disc, y, x]) * 255).astype(np.uint8), "RGB").save(folder / INPUT_IMAGES[2])


def tiny(prompt: dict, checkpoint: str) -> dict:
    """The workflow at TINY px, one step, on the test checkpoint (as the client's overrides do)."""
    sizes = {"width": TINY, "height": TINY} if any("width" in n["inputs"] for n in prompt.values()) else {}
    client_module().apply_overrides(prompt, **sizes,
                                    sets=[f"CheckpointLoaderSimple.ckpt_name={checkpoint}", "KSampler.steps=1"])
    return prompt


def expected_saves(prompt: dict) -> dict[str, bool]:
    """SaveImage node id -> whether it saves RGBA (fed by a decoder's first output)."""
    saves = {}
    for node_id, node in prompt.items():
        if node["class_type"] == "SaveImage":
            source, slot = node["inputs"]["images"]
            saves[node_id] = prompt[source]["class_type"] in DECODERS and slot == 0
    return saves


def output_size(prompt: dict) -> int:
    """The side of the images a TINY workflow saves: twice TINY after an Upscale (RGBA) that
    follows its scale_by (the hires fix)."""
    scaled = [node for node in prompt.values() if node["class_type"] == "LayeredDiffusionUpscaleRGBA"
              and node["inputs"].get("width") == 0 and node["inputs"].get("height") == 0]
    return round(TINY * scaled[0]["inputs"]["scale_by"]) if scaled else TINY


def assert_saved_as_expected(server: ComfyServer, prompt: dict, entry: dict) -> None:
    """The finished prompt saved PNGs of the workflow's output size at every Save Image, RGBA where
    a decoder feeds it; every Save Layers wrote RGBA layer PNGs with a PSD and an OpenRaster file
    beside them; every Preview Image showed something."""
    size = output_size(prompt)
    for node_id, node in prompt.items():
        if node["class_type"] == "LayeredDiffusionSaveLayers":
            layers = server.output_files(entry, node_id)
            assert layers, node_id
            for path in layers:
                with Image.open(path) as png:
                    assert png.mode == "RGBA" and png.size == (size, size), (path.name, png.mode, png.size)
                stem = path.name.rsplit("_", 1)[0] + "_"
                assert (path.parent / f"{stem}.psd").is_file() and (path.parent / f"{stem}.ora").is_file()
    saves = expected_saves(prompt)
    assert saves and any(saves.values()) == any(n["class_type"] in DECODERS for n in prompt.values())
    for node_id, rgba in saves.items():
        files = server.output_files(entry, node_id)
        assert files, node_id
        for path in files:
            with Image.open(path) as png:
                assert png.format == "PNG" and png.size == (size, size)
                assert png.mode == ("RGBA" if rgba else "RGB"), (node_id, png.mode)
    previews = [n for n, node in prompt.items() if node["class_type"] == "PreviewImage"]
    assert all(entry["outputs"][n]["images"] for n in previews)


def size_mismatch_prompt(prefix: str) -> dict:
    """A prompt that fails inside Layer Diffuse Decode (RGBA): 64x64 latents with a 128x64 image."""
    return {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 64, "batch_size": 1, "color": 0}},
        "3": {"class_type": "LayeredDiffusionDecodeRGBA",
              "inputs": {"samples": ["1", 0], "images": ["2", 0], "sd_version": "SD15", "sub_batch_size": 1}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }
