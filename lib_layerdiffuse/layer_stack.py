"""A stack of same-size RGBA layers, as the layered file writers take it, and its composite.

Layers are 8-bit straight-alpha RGBA arrays [H, W, 4], listed bottom to top, each with an opacity.
The composite is the visible layers stacked with the "over" operator on the 8-bit sRGB values, as
Photoshop, Krita and GIMP show a normal-mode stack by default.

A layer placed somewhere on a larger canvas (core's LAYERS items carry a position and a display
size) is brought onto the canvas by `place_on_canvas` before it joins a stack.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .rgba_upscale import resize_rgba


@dataclass(frozen=True)
class Layer:
    name: str
    pixels: np.ndarray  # uint8 [H, W, 4], straight alpha
    visible: bool = True
    opacity: float = 1.0  # in [0, 1], applied over the pixels' own alpha


def to_rgba8(rgb: torch.Tensor, alpha: torch.Tensor) -> np.ndarray:
    """uint8 [H, W, 4] of colour [3,H,W] and alpha [1,H,W] in [0,1], rounded as ComfyUI's Save
    Image rounds (255 * value, clipped, truncated)."""
    pixels = torch.cat([rgb, alpha], dim=0).movedim(0, -1).detach().float().cpu().numpy()
    return np.clip(255.0 * pixels, 0, 255).astype(np.uint8)


def check_stack(layers: list[Layer]) -> tuple[int, int]:
    """(height, width) of a non-empty stack whose layers all have that size."""
    if not layers:
        raise InputError("a layered file needs at least one layer")
    size = layers[0].pixels.shape[:2]
    for layer in layers:
        if layer.pixels.shape != (*size, 4) or layer.pixels.dtype != np.uint8:
            raise InputError(f"layer {layer.name!r} is {layer.pixels.shape[1]}x{layer.pixels.shape[0]}; "
                             f"every layer must be {size[1]}x{size[0]} RGBA")
        if not 0.0 <= layer.opacity <= 1.0:
            raise InputError(f"layer {layer.name!r} has opacity {layer.opacity}; opacity is between 0 and 1")
    return size


def place_on_canvas(rgb: torch.Tensor, alpha: torch.Tensor, canvas: tuple[int, int], x: int, y: int,
                    size: tuple[int, int], flip_h: bool = False, flip_v: bool = False,
                    method: str = "lanczos") -> tuple[torch.Tensor, torch.Tensor]:
    """(colour [B,3,H,W], alpha [B,1,H,W]) of a canvas of (H, W) = `canvas`, transparent but for
    the layer [B,3,h,w] / [B,1,h,w] resized (premultiplied, so without fringes) to
    (height, width) = `size`, flipped as asked, with its top left corner at (x, y). What falls
    outside the canvas is cut off."""
    rgb, alpha = rgb.float(), alpha.float()
    if tuple(rgb.shape[-2:]) != tuple(size):
        rgb, alpha = resize_rgba(rgb, alpha, *size, method)
    flips = [dim for dim, flip in ((-1, flip_h), (-2, flip_v)) if flip]
    if flips:
        rgb, alpha = rgb.flip(flips), alpha.flip(flips)
    height, width = canvas
    out_rgb = rgb.new_zeros(rgb.shape[0], 3, height, width)
    out_alpha = alpha.new_zeros(alpha.shape[0], 1, height, width)
    top, left = max(y, 0), max(x, 0)
    bottom, right = min(y + size[0], height), min(x + size[1], width)
    if top < bottom and left < right:
        window = (slice(None), slice(None), slice(top - y, bottom - y), slice(left - x, right - x))
        out_rgb[..., top:bottom, left:right] = rgb[window]
        out_alpha[..., top:bottom, left:right] = alpha[window]
    return out_rgb, out_alpha


def composite(layers: list[Layer]) -> np.ndarray:
    """uint8 [H, W, 4]: the visible layers, bottom to top, over transparency."""
    height, width = check_stack(layers)
    colour = np.zeros((height, width, 3))
    alpha = np.zeros((height, width, 1))
    for layer in layers:
        if not layer.visible:
            continue
        top = layer.pixels / 255.0
        top_alpha = top[..., 3:] * layer.opacity
        premultiplied = top[..., :3] * top_alpha + colour * alpha * (1 - top_alpha)
        alpha = top_alpha + alpha * (1 - top_alpha)
        colour = np.divide(premultiplied, alpha, out=np.zeros_like(premultiplied), where=alpha > 0)
    return np.round(255.0 * np.concatenate([colour, alpha], axis=-1)).astype(np.uint8)
