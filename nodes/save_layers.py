"""Save Layers: the layered modes' foreground, background and blended images as layer PNGs and as
one layered file per image (PSD, OpenRaster) in ComfyUI's output folder; on ComfyUI versions
with the LAYERS type also as a layer document for core's Create Layered Image, and a LAYERS
document (Add Layer's, any number of layers) saved the same way, one file for the document.

Stack, bottom to top: background, foreground, blended. The blended image is the model's own
picture of the foreground over the background, so it is kept as a hidden reference layer on top:
the visible stack is the foreground over the background, and showing the blended layer compares
the two at a click.
"""
from __future__ import annotations

import json
import os
import re

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import folder_paths
from comfy.cli_args import args
from comfy_api.latest import io, ui

from ..lib_layerdiffuse.errors import InputError
from ..lib_layerdiffuse.layer_stack import Layer, place_on_canvas, to_rgba8
from ..lib_layerdiffuse.openraster_file import write_ora
from ..lib_layerdiffuse.psd_file import write_psd
from .host_compat import layers_type, schema
from .layers_document import document_frames
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


def _output_folder(filename_prefix: str, width: int, height: int) -> tuple[str, str, int, str]:
    """(folder, file name start, counter, subfolder) in ComfyUI's output folder, as Save Image
    numbers its files; a prefix that leads out of the output folder is refused before anything
    is written."""
    output = os.path.abspath(folder_paths.get_output_directory())
    folder = os.path.abspath(os.path.join(output, os.path.dirname(os.path.normpath(filename_prefix))))
    if os.path.commonpath((output, folder)) != output:
        raise InputError(f"{NODE}: filename_prefix {filename_prefix!r} leads out of ComfyUI's output folder; use a "
                         "name inside it, such as layerdiffuse/layers")
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output, width, height)
    return folder, filename, counter, subfolder


def _file_name_part(name: str) -> str:
    """A layer name as a safe part of a file name."""
    return re.sub(r"[^\w\- ]+", "_", name).strip() or "layer"


def _document_stack(document) -> list[Layer]:
    """The layers of a LAYERS document, each placed on the document's canvas, bottom to top."""
    canvas, frames = document_frames(document, NODE)
    stack = []
    for frame in frames:
        rgb, alpha = place_on_canvas(frame.rgb, frame.alpha, canvas, frame.x, frame.y, frame.size,
                                     frame.flip_h, frame.flip_v)
        stack.append(Layer(frame.name, to_rgba8(rgb[0], alpha[0]), frame.visible, frame.opacity))
    return stack


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
                io.Image.Input("foreground", optional=layers is not None,
                               tooltip="The foreground layer, RGBA (e.g. Layer Diffuse Decode (RGBA) or "
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
                *([layers.Input("layers", optional=True,
                                tooltip="Instead of the images: a layer stack (Add Layer), saved as one layered file "
                                        "with every layer named, in order, placed on the document's canvas.")]
                  if layers else []),
            ],
            outputs=[layers.Output(display_name="LAYERS", tooltip="The layers as a layer stack for Create "
                                   "Layered Image (blended hidden).")] if layers else [],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, filename_prefix: str, layered_format: str, foreground: torch.Tensor | None = None,
                foreground_mask: torch.Tensor | None = None, background: torch.Tensor | None = None,
                blended: torch.Tensor | None = None, layers: dict | None = None) -> io.NodeOutput:
        connected = [name for name, value in (("foreground", foreground), ("foreground_mask", foreground_mask),
                                              ("background", background), ("blended", blended)) if value is not None]
        if layers is not None and connected:
            raise InputError(f"{NODE}: both layers and {', '.join(connected)} are connected; connect either a layer "
                             "stack or the images (add the images to the stack with Add Layer)")
        if layers is None and foreground is None:
            raise InputError(f"{NODE}: nothing to save; connect a foreground image (or a layer stack to layers)")
        if layers is not None:
            stacks = [_document_stack(layers)]
        else:
            images = _rgba_inputs(foreground, foreground_mask, background, blended)
            stacks = [[Layer(name, to_rgba8(rgba[i, :3], rgba[i, 3:]), visible) for name, rgba, visible in images]
                      for i in range(images[0][1].shape[0])]
        height, width = stacks[0][0].pixels.shape[:2]
        folder, filename, counter, subfolder = _output_folder(filename_prefix, width, height)
        metadata = _png_metadata(cls.hidden)
        saved = []
        for i, stack in enumerate(stacks):
            base = f"{filename.replace('%batch_num%', str(i))}_{counter + i:05}_"
            for index, layer in enumerate(stack):
                part = layer.name if layers is None else f"{index + 1:02}_{_file_name_part(layer.name)}"
                file = f"{base}{part}.png"
                Image.fromarray(layer.pixels, "RGBA").save(os.path.join(folder, file), pnginfo=metadata, compress_level=4)
                saved.append(ui.SavedResult(file, subfolder, io.FolderType.output))
            for extension in LAYERED_FORMATS[layered_format]:
                WRITERS[extension](os.path.join(folder, f"{base}.{extension}"), stack)
        preview = ui.SavedImages(saved)
        if not layers_type():
            return io.NodeOutput(ui=preview)
        return io.NodeOutput(layers if layers is not None else _layers_document(images), ui=preview)


SAVE_LAYERS_NODES = [LayeredDiffusionSaveLayers]
