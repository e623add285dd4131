"""Save Layers: the layered modes' foreground, background and blended images as layer PNGs and as
one layered file per image (PSD, OpenRaster) in ComfyUI's output folder; on ComfyUI versions
with the LAYERS type also as a layer document for core's Create Layered Image.

Stack, bottom to top: background, foreground, blended. The blended image is the model's own
picture of the foreground over the background, so it is kept as a hidden reference layer on top:
the visible stack is the foreground over the background, and showing the blended layer compares
the two at a click.
"""
from __future__ import annotations

import json
import os

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import folder_paths
from comfy.cli_args import args
from comfy_api.latest import io, ui

from ..lib_layerdiffuse.errors import InputError
from ..lib_layerdiffuse.layer_stack import Layer, to_rgba8
from ..lib_layerdiffuse.openraster_file import write_ora
from ..lib_layerdiffuse.psd_file import write_psd
from .host_compat import layers_type, schema
from .naming import CATEGORY, SEARCH_ALIASES
from .rgba_io import split_rgba

NODE = "Layer Diffuse Save Layers"
LAYERED_FORMATS = {"PSD": ("psd",), "OpenRaster": ("ora",), "PSD + OpenRaster": ("psd", "ora")}
WRITERS = {"psd": write_psd, "ora": write_ora}


def _png_metadata(hidden) -> PngInfo | None:
    """The prompt and workflow, as core's Save Image embeds them (unless --disable-metadata)."""
    if args.disable_metadata or hidden is None:
        return None
    metadata = PngInfo()
    if hidden.prompt is not None:
        metadata.add_text("prompt", json.dumps(hidden.prompt))
    for key, value in (hidden.extra_pnginfo or {}).items():
        metadata.add_text(key, json.dumps(value))
    return metadata


def _rgba_inputs(foreground: torch.Tensor, foreground_mask: torch.Tensor | None, background: torch.Tensor | None,
                 blended: torch.Tensor | None) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, [B,4,H,W] RGBA, visible) of every connected image, bottom to top, one batch size."""
    named = [("background", background, None, True), ("foreground", foreground, foreground_mask, True),
             ("blended", blended, None, False)]
    named = [(name, image, mask, visible) for name, image, mask, visible in named if image is not None]
    size = tuple(foreground.shape[1:3])
    batch = max(image.shape[0] for _, image, _, _ in named)
    layers = []
    for name, image, mask, visible in named:
        if tuple(image.shape[1:3]) != size:
            raise InputError(f"{NODE}: {name} is {image.shape[2]}x{image.shape[1]} but foreground is "
                             f"{size[1]}x{size[0]}; connect images of the same size")
        if image.shape[0] not in (1, batch):
            raise InputError(f"{NODE}: {name} has {image.shape[0]} images, another input {batch}; connect "
                             "batches of the same size (or a single image to use for all)")
        rgb, alpha = split_rgba(image, mask, NODE, name)
        layers.append((name, torch.cat([rgb, alpha], dim=1).expand(batch, -1, -1, -1), visible))
    return layers


def _layers_document(images: list[tuple[str, torch.Tensor, bool]]) -> dict:
    """A LAYERS document: every image's layers, grouped per image in batch order, bottom to top."""
    batch, _, height, width = images[0][1].shape
    items = []
    for i in range(batch):
        for name, rgba, visible in images:
            items.append({"image": rgba[i : i + 1].movedim(1, -1).contiguous(), "type": "raster",
                          "z_index": len(items), "name": name if batch == 1 else f"{name} {i + 1}",
                          "visible": visible})
    return {"version": 1, "canvas": (width, height), "layers": items}


class LayeredDiffusionSaveLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        layers = layers_type()
        return schema(
            node_id="LayeredDiffusionSaveLayers",
            display_name=NODE,
            category=CATEGORY,
            search_aliases=[*SEARCH_ALIASES, "psd", "openraster", "export"],
            description="Save the layers of a layered generation (foreground, background, blended) as RGBA PNGs "
                        "and as one layered file per image (PSD and/or OpenRaster) that Photoshop, Krita, GIMP "
                        "and Photopea open: background at the bottom, foreground above, blended as a hidden layer.",
            inputs=[
                io.Image.Input("foreground", tooltip="The foreground layer, RGBA (e.g. Layer Diffuse Decode (RGBA) or "
                               "the first output of Decode (Split)), or RGB with foreground_mask."),
                io.Mask.Input("foreground_mask", optional=True,
                              tooltip="The foreground's transparency in LoadImage's convention (1 = transparent); "
                                      "without it a 4-channel foreground's alpha is used."),
                io.Image.Input("background", optional=True,
                               tooltip="The background layer (RGB, or RGBA), the same size as the foreground."),
                io.Image.Input("blended", optional=True,
                               tooltip="The blended image (the model's composite), saved as a hidden top layer."),
                io.String.Input("filename_prefix", default="layerdiffuse/layers",
                                tooltip="Folder and file name start in ComfyUI's output folder; may contain "
                                        "%date:yyyy-MM-dd% or %width% like Save Image's prefix."),
                io.Combo.Input("layered_format", options=list(LAYERED_FORMATS), default="PSD + OpenRaster",
                               tooltip="Layered file(s) written per image besides the layer PNGs: PSD "
                                       "(Photoshop, Photopea, Krita, GIMP), OpenRaster .ora (Krita, GIMP, MyPaint)."),
            ],
            outputs=[layers.Output(display_name="LAYERS", tooltip="The layers as a layer stack for Create "
                                   "Layered Image (blended hidden).")] if layers else [],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, foreground: torch.Tensor, filename_prefix: str, layered_format: str,
                foreground_mask: torch.Tensor | None = None, background: torch.Tensor | None = None,
                blended: torch.Tensor | None = None) -> io.NodeOutput:
        images = _rgba_inputs(foreground, foreground_mask, background, blended)
        batch, _, height, width = images[0][1].shape
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), width, height)
        metadata = _png_metadata(cls.hidden)
        saved = []
        for i in range(batch):
            stack = [Layer(name, to_rgba8(rgba[i, :3], rgba[i, 3:]), visible) for name, rgba, visible in images]
            base = f"{filename.replace('%batch_num%', str(i))}_{counter + i:05}_"
            for layer in stack:
                file = f"{base}{layer.name}.png"
                Image.fromarray(layer.pixels, "RGBA").save(os.path.join(folder, file), pnginfo=metadata, compress_level=4)
                saved.append(ui.SavedResult(file, subfolder, io.FolderType.output))
            for extension in LAYERED_FORMATS[layered_format]:
                WRITERS[extension](os.path.join(folder, f"{base}.{extension}"), stack)
        preview = ui.SavedImages(saved)
        if layers_type():
            return io.NodeOutput(_layers_document(images), ui=preview)
        return io.NodeOutput(ui=preview)


SAVE_LAYERS_NODES = [LayeredDiffusionSaveLayers]
