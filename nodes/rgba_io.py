"""RGBA images at the node boundary.

ComfyUI passes images as IMAGE [B,H,W,C] (C = 3, or 4 with alpha last) and transparency as MASK
[B,H,W] in LoadImage's convention (1 = transparent). The library works on colour [B,3,H,W] and
alpha [B,1,H,W] (1 = opaque). These helpers translate, the same way for every node.
"""
from __future__ import annotations

import torch

import comfy.utils
from comfy_api.latest import io

from ..lib_layerdiffuse.errors import InputError
from ..lib_layerdiffuse.finite import IMAGE_CURE, require_finite
from ..lib_layerdiffuse.rgba import split_image


def rgba_image_inputs() -> list[io.Input]:
    """An image and its optional LoadImage-style mask."""
    return [
        io.Image.Input("image", tooltip="The image; if it has 4 channels and no mask is connected, "
                       "its 4th channel is the alpha."),
        io.Mask.Input("mask", optional=True, tooltip="Transparency in LoadImage's convention: 1 = transparent, "
                      "0 = opaque (connect LoadImage's MASK). Without it the image is opaque unless it is RGBA."),
    ]


def mask_alpha(mask: torch.Tensor, batch: int, height: int, width: int, node: str, what: str) -> torch.Tensor:
    """[B,1,H,W] alpha (1 = opaque) of a LoadImage-style mask. A mask of another size is resized
    to the image's; one mask serves the whole batch."""
    if mask.dim() < 2 or 0 in mask.shape:
        raise InputError(f"{node}: {what} has shape {list(mask.shape)}; connect a MASK [B,H,W] such as LoadImage's")
    require_finite(mask, node, what, IMAGE_CURE)
    mask = mask.reshape((-1,) + tuple(mask.shape[-2:])).float().unsqueeze(1)
    if mask.shape[0] not in (1, batch):
        raise InputError(f"{node}: {mask.shape[0]} masks for {batch} images; connect one mask per image or a single mask")
    if mask.shape[-2:] != (height, width):
        mask = comfy.utils.common_upscale(mask, width, height, "bilinear", "disabled")
    return (1.0 - mask).expand(batch, 1, height, width).clamp(0, 1)


def split_rgba(image: torch.Tensor, mask: torch.Tensor | None, node: str,
               what: str = "image") -> tuple[torch.Tensor, torch.Tensor]:
    """(colour [B,3,H,W], alpha [B,1,H,W]) of an IMAGE and its optional mask, as float32, checked:
    alpha is 1 - mask, else the image's own alpha channel, else opaque. `what` names the input
    in errors."""
    rgb, alpha = split_image(image, node, what)
    if mask is not None:
        alpha = mask_alpha(mask, rgb.shape[0], rgb.shape[-2], rgb.shape[-1], node, f"the mask of {what}")
    elif alpha is None:
        alpha = torch.ones(rgb.shape[0], 1, rgb.shape[-2], rgb.shape[-1], device=image.device)
    return rgb, alpha.to(image.device)


def join_rgba(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """An RGBA IMAGE [B,H,W,4] (alpha last, 1 = opaque) from colour and alpha."""
    return torch.cat([rgb, alpha], dim=1).movedim(1, -1)


def alpha_output(what: str = "The predicted alpha") -> io.Mask.Output:
    """A MASK output carrying alpha (1 = opaque), which is the opposite of LoadImage's masks."""
    return io.Mask.Output(display_name="MASK", tooltip=f"{what}: 1 = opaque, 0 = transparent (the opposite of "
                          "LoadImage's mask; invert it to use it as one).")
