"""Running the shipped API workflows on a live server at a tiny size, and what they must save."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from .client import client_module
from .server import ComfyServer
from .workflows import DECODERS

# Nodes whose first output is an RGBA image.
RGBA_SOURCES = DECODERS | {"LayeredDiffusionUpscaleRGBA"}

TINY = 64
# Test inputs named like the shipped workflows' Load Image values.
INPUT_IMAGES = ("layerdiffuse_fg.png", "layerdiffuse_bg.png", "layerdiffuse_blend.png")


# The upscale model file the shipped workflows name; a test server gets a small real one under it.
UPSCALE_MODEL = "RealESRGAN_x4plus.safetensors"


def sized_name(name: str, size: tuple[int, int]) -> str:
    return name if size == (TINY, TINY) else f"{Path(name).stem}_{size[0]}x{size[1]}.png"


def write_inputs(folder: Path, size: tuple[int, int] = (TINY, TINY)) -> None:
    """The Load Image files the shipped workflows name: a transparent foreground, a background and
    a blend, TINY pixels square (or width x height = `size`, named by `sized_name`)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / np.array([height - 1, width - 1])[:, None, None]
    rgb = np.stack([x, y, 1 - x], axis=-1)
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).astype(np.float64)
    names = [folder / sized_name(name, size) for name in INPUT_IMAGES]
    Image.fromarray((np.dstack([rgb, disc]) * 255).astype(np.uint8), "RGBA").save(names[0])
    Image.fromarray((np.dstack([y, y, x]) * 255).astype(np.uint8), "RGB").save(names[1])
    Image.fromarray((np.dstack([x * disc, y, x]) * 255).astype(np.uint8), "RGB").save(names[2])


def size_nodes(prompt: dict) -> list[str]:
    """The nodes that set the workflow's size (a width and height above 0 of their own); every
    other size follows them by a link or a factor. None: the size is the input images'."""
    return [node_id for node_id, node in prompt.items()
            if any(isinstance(node["inputs"].get(k), int) and node["inputs"][k] > 0 for k in ("width", "height"))]


def at_size(prompt: dict, size: tuple[int, int]) -> dict:
    """The workflow made at width x height = `size` by changing its one size: the node that sets
    it, or else the input images (read from files written by `write_inputs(folder, size)`)."""
    nodes = size_nodes(prompt)
    assert len(nodes) <= 1, f"the size is set in {len(nodes)} places: {nodes}"
    if nodes:
        prompt[nodes[0]]["inputs"].update(width=size[0], height=size[1])
    else:
        for node in prompt.values():
            if node["class_type"] == "LoadImage":
                node["inputs"]["image"] = sized_name(node["inputs"]["image"], size)
    return prompt


def tiny(prompt: dict, checkpoint: str) -> dict:
    """The workflow at TINY px, one step, on the test checkpoint (as the client's overrides do)."""
    sizes = {"width": TINY, "height": TINY} if any("width" in n["inputs"] for n in prompt.values()) else {}
    client_module().apply_overrides(prompt, **sizes,
                                    sets=[f"CheckpointLoaderSimple.ckpt_name={checkpoint}", "KSampler.steps=1"])
    return prompt


def expected_saves(prompt: dict) -> dict[str, bool]:
    """SaveImage node id -> whether it saves RGBA (fed by a decoder's or Upscale (RGBA)'s first output)."""
    saves = {}
    for node_id, node in prompt.items():
        if node["class_type"] == "SaveImage":
            source, slot = node["inputs"]["images"]
            saves[node_id] = prompt[source]["class_type"] in RGBA_SOURCES and slot == 0
    return saves


def output_size(prompt: dict, size: tuple[int, int] = (TINY, TINY)) -> tuple[int, int]:
    """(width, height) of the images a workflow made at `size` saves: times scale_by after an
    Upscale (RGBA) that follows its scale_by (the hires fix, a model upscale) or an Upscale
    Layers (RGBA)."""
    scaled = [node for node in prompt.values() if node["class_type"] == "LayeredDiffusionUpscaleLayers" or (
              node["class_type"] == "LayeredDiffusionUpscaleRGBA"
              and node["inputs"].get("width") == 0 and node["inputs"].get("height") == 0)]
    factor = scaled[0]["inputs"]["scale_by"] if scaled else 1
    return round(size[0] * factor), round(size[1] * factor)


def assert_saved_as_expected(server: ComfyServer, prompt: dict, entry: dict,
                             made_at: tuple[int, int] = (TINY, TINY)) -> None:
    """The finished prompt saved PNGs of the workflow's output size at every Save Image, RGBA where
    a decoder or Upscale (RGBA) feeds it; every Save Layers wrote RGBA layer PNGs with its layered
    files beside them; every Preview Image showed something."""
    size = output_size(prompt, made_at)
    layered = [node_id for node_id, node in prompt.items() if node["class_type"] == "LayeredDiffusionSaveLayers"]
    for node_id in layered:
        layers = server.output_files(entry, node_id)
        assert layers, node_id
        extensions = {"PSD": ("psd",), "OpenRaster": ("ora",), "PSD + OpenRaster": ("psd", "ora")}[
            prompt[node_id]["inputs"]["layered_format"]]
        for path in layers:
            with Image.open(path) as png:
                assert png.mode == "RGBA" and png.size == size, (path.name, png.mode, png.size)
            base = re.match(r".*_\d{5}_", path.name).group(0)  # Save Layers' <prefix>_<counter>_<layer>.png
            assert all((path.parent / f"{base}.{extension}").is_file() for extension in extensions), path.name
    saves = expected_saves(prompt)
    assert saves or layered
    if any(n["class_type"] in DECODERS for n in prompt.values()):
        assert any(saves.values()), "the RGBA result is not saved"
    for node_id, rgba in saves.items():
        files = server.output_files(entry, node_id)
        assert files, node_id
        for path in files:
            with Image.open(path) as png:
                assert png.format == "PNG" and png.size == size
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
