"""Upscale (RGBA): resize transparent images by resampling or with a ComfyUI upscale model,
without dark or foreign fringes along the edges (the maths is in lib_layerdiffuse.rgba_upscale).

Core's Upscale Image (using Model) cannot take RGBA: its 3-channel models would get 4 channels.
Here a model runs twice per image, on the colour (bled into the transparent pixels) and on alpha
as a grey image, through ComfyUI's tiling with core's out-of-memory fallback. Upscale Layers
(RGBA) does the same to every layer of a LAYERS document (hosts with core's layered images).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

import comfy.model_management as model_management
import comfy.utils
from comfy_api.latest import io

from ..lib_layerdiffuse.errors import InputError, ModelError
from ..lib_layerdiffuse.rgba_upscale import (
    RESAMPLE_METHODS,
    centre_crop_to_aspect,
    output_size,
    resize_rgba,
    upscale_rgba_with_model,
)
from .batch_sizing import in_sub_batches, resize_batch
from .host_compat import is_oom, layers_type, schema, upscale_model_on_device
from .layers_document import scale_document
from .naming import CATEGORY, SEARCH_ALIASES
from .rgba_io import alpha_output, join_rgba, rgba_image_inputs, split_rgba

NODE = "Layer Diffuse Upscale (RGBA)"
MAX_SIDE = 16384  # ComfyUI's MAX_RESOLUTION
TILE = 512
TILE_OVERLAP = 32
MIN_TILE = 128
# Core's estimate of an upscale model's working memory per input pixel and unit of scale.
MODEL_BYTES_PER_PIXEL = 3 * 4 * 384


@contextmanager
def _model_on_device(upscale_model, image: torch.Tensor) -> Iterator[torch.device]:
    """The upscale model on ComfyUI's device for the block, with room for a tile's work."""
    memory = TILE * TILE * MODEL_BYTES_PER_PIXEL * max(upscale_model.scale, 1.0) + image.nelement() * 4
    with upscale_model_on_device(upscale_model, memory) as device:
        yield device


def tiled_model(upscale_model, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """[N,3,H,W] -> [N,3,H*s,W*s] through the model tile by tile, with a progress bar, halving the
    tiles on running out of memory as core's Upscale Image (using Model) does."""
    def run_tile(tile: torch.Tensor) -> torch.Tensor:
        model_management.throw_exception_if_processing_interrupted()
        return upscale_model(tile.to(upscale_model.dtype))

    def run(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device)
        tile = TILE
        while True:
            try:
                steps = images.shape[0] * comfy.utils.get_tiled_scale_steps(
                    images.shape[-1], images.shape[-2], tile_x=tile, tile_y=tile, overlap=TILE_OVERLAP)
                return comfy.utils.tiled_scale(
                    images, run_tile, tile_x=tile, tile_y=tile, overlap=TILE_OVERLAP,
                    upscale_amount=upscale_model.scale, pbar=comfy.utils.ProgressBar(steps),
                    output_device=model_management.intermediate_device())
            except Exception as error:
                if not is_oom(error) or tile // 2 < MIN_TILE:
                    raise
                tile //= 2

    return run


def _check_model(upscale_model) -> None:
    channels = (getattr(upscale_model, "input_channels", None), getattr(upscale_model, "output_channels", None))
    if channels != (3, 3):
        raise ModelError(f"{NODE}: the upscale model takes {channels[0]} and gives {channels[1]} channels; "
                         "load a 3-channel (RGB) image upscale model")


def _resample(rgb: torch.Tensor, alpha: torch.Tensor, size: tuple[int, int],
              method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Premultiplied resize, image by image (bounded memory, progress, interruption)."""
    bar = comfy.utils.ProgressBar(rgb.shape[0])
    colours, alphas = [], []
    for i in range(rgb.shape[0]):
        model_management.throw_exception_if_processing_interrupted()
        colour, new_alpha = resize_rgba(rgb[i : i + 1], alpha[i : i + 1], *size, method)
        colours.append(colour)
        alphas.append(new_alpha)
        bar.update(1)
    return torch.cat(colours), torch.cat(alphas)


def _upscale(rgb: torch.Tensor, alpha: torch.Tensor, size: tuple[int, int], upscale_method: str, node: str,
             upscale_model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """RGBA resized to size = (height, width) by resampling, or by the upscale model and then
    resampling to the size asked for, as many images at once as the free memory holds."""
    if upscale_model is None:
        resize_batch(rgb.shape, size, node)  # only the refusal: _resample goes image by image
        return _resample(rgb, alpha, size, upscale_method)
    _check_model(upscale_model)
    step = resize_batch(rgb.shape, size, node, upscale_model.scale)
    with _model_on_device(upscale_model, rgb) as device:
        upscale = tiled_model(upscale_model, device)
        return in_sub_batches(lambda c, a: upscale_rgba_with_model(c, a, upscale, *size, upscale_method),
                              step, rgb, alpha)


def _method_input() -> io.Combo.Input:
    return io.Combo.Input("upscale_method", options=list(RESAMPLE_METHODS), default="lanczos",
                          tooltip="How to resample. With an upscale model: how its output is brought to the "
                                  "size asked for, if that differs from the model's scale. lanczos is computed "
                                  "in float; bilinear and bicubic are antialiased when shrinking.")


def _model_input() -> io.UpscaleModel.Input:
    return io.UpscaleModel.Input("upscale_model", optional=True,
                                 tooltip="An RGB upscale model (Load Upscale Model). Without one the image is "
                                         "resampled with upscale_method.")


class LayeredDiffusionUpscaleRGBA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionUpscaleRGBA",
            display_name=NODE,
            category=CATEGORY,
            search_aliases=[*SEARCH_ALIASES, "upscale", "resize"],
            description="Resize a transparent image without dark or coloured fringes along its edges: colour is "
                        "resampled premultiplied by alpha, or an upscale model sees the visible colours bled into "
                        "the transparent pixels and upscales alpha separately.",
            inputs=[
                *rgba_image_inputs(),
                _method_input(),
                io.Float.Input("scale_by", default=2.0, min=0.01, max=8.0, step=0.01,
                               tooltip="Size factor, used when width and height are both 0. With an upscale model, "
                                       "set it to the model's scale (e.g. 4) to keep the model's output size."),
                io.Int.Input("width", default=0, min=0, max=MAX_SIDE, step=1,
                             tooltip="Output width; 0 = from the height and the aspect ratio, or from scale_by "
                                     "when the height is 0 too."),
                io.Int.Input("height", default=0, min=0, max=MAX_SIDE, step=1,
                             tooltip="Output height; 0 = from the width and the aspect ratio, or from scale_by "
                                     "when the width is 0 too."),
                io.Combo.Input("crop", options=["disabled", "center"], default="disabled",
                               tooltip="With both width and height set: center cuts the image to their aspect "
                                       "ratio first; disabled stretches it."),
                _model_input(),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The resized image, RGBA (4 channels, alpha last)."),
                alpha_output("The resized alpha"),
            ],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, upscale_method: str, scale_by: float, width: int, height: int,
                crop: str, mask: torch.Tensor | None = None, upscale_model=None) -> io.NodeOutput:
        rgb, alpha = split_rgba(image, mask, NODE)
        size = output_size(rgb.shape[-2], rgb.shape[-1], scale_by, width, height)
        if max(size) > MAX_SIDE:
            raise InputError(f"{NODE}: the output would be {size[1]}x{size[0]}, over {MAX_SIDE} pixels on a side; "
                             "lower scale_by, width or height")
        if crop == "center" and width > 0 and height > 0:
            rgb, alpha = (centre_crop_to_aspect(x, *size) for x in (rgb, alpha))
        rgb, alpha = _upscale(rgb, alpha, size, upscale_method, NODE, upscale_model)
        out = join_rgba(rgb, alpha).to(model_management.intermediate_device())
        return io.NodeOutput(out, out[..., 3])


LAYERS_NODE = "Layer Diffuse Upscale Layers (RGBA)"


class LayeredDiffusionUpscaleLayers(io.ComfyNode):
    """Only on hosts with the LAYERS type (see UPSCALE_NODES)."""
    @classmethod
    def define_schema(cls) -> io.Schema:
        layers = layers_type()
        return schema(
            node_id="LayeredDiffusionUpscaleLayers",
            display_name=LAYERS_NODE,
            category=CATEGORY,
            search_aliases=[*SEARCH_ALIASES, "upscale", "resize", "psd"],
            description="Resize every layer of a layer stack (Add Layer) and its placement by one factor, without "
                        "fringes, as Upscale (RGBA) resizes an image; the stack keeps its names, order and settings.",
            inputs=[
                layers.Input("layers", tooltip="The layer stack (Add Layer, Save Layers). A layer's mask is folded "
                                               "into its alpha."),
                _method_input(),
                io.Float.Input("scale_by", default=2.0, min=0.01, max=8.0, step=0.01,
                               tooltip="Size factor for every layer, its position and the canvas. With an upscale "
                                       "model, set it to the model's scale (e.g. 4) to keep the model's output size."),
                _model_input(),
            ],
            outputs=[layers.Output(display_name="LAYERS", tooltip="The resized layer stack, every layer RGBA.")],
        )

    @classmethod
    def execute(cls, layers: dict, upscale_method: str, scale_by: float, upscale_model=None) -> io.NodeOutput:
        def resize(rgb: torch.Tensor, alpha: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
            if max(size) > MAX_SIDE:
                raise InputError(f"{LAYERS_NODE}: a layer would be {size[1]}x{size[0]}, over {MAX_SIDE} pixels on "
                                 "a side; lower scale_by")
            rgb, alpha = _upscale(rgb, alpha, size, upscale_method, LAYERS_NODE, upscale_model)
            return rgb.to(model_management.intermediate_device()), alpha.to(model_management.intermediate_device())

        return io.NodeOutput(scale_document(layers, scale_by, LAYERS_NODE, resize))


UPSCALE_NODES = [LayeredDiffusionUpscaleRGBA, *([LayeredDiffusionUpscaleLayers] if layers_type() else [])]
