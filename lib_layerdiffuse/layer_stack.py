"""A stack of same-size RGBA layers, as the layered file writers take it, and its composite.

Layers are 8-bit straight-alpha RGBA arrays [H, W, 4], listed bottom to top. The composite is
the visible layers stacked with the "over" operator on the 8-bit sRGB values, as Photoshop,
Krita and GIMP show a normal-mode stack by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError


@dataclass(frozen=True)
class Layer:
    name: str
    pixels: np.ndarray  # uint8 [H, W, 4], straight alpha
    visible: bool = True


def to_rgba8(rgb: torch.Tensor, alpha: torch.Tensor) -> np.ndarray:
    """uint8 [H, W, 4] of colour [3,H,W] and alpha [1,H,W] in [0,1], rounded as ComfyUI's Save
    Image rounds (255 * value, clipped, truncated)."""
    pixels = torch.cat([rgb, alpha], dim=0).movedim(0, -1).float().cpu().numpy()
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
    return size


def composite(layers: list[Layer]) -> np.ndarray:
    """uint8 [H, W, 4]: the visible layers, bottom to top, over transparency."""
    height, width = check_stack(layers)
    colour = np.zeros((height, width, 3))
    alpha = np.zeros((height, width, 1))
    for layer in layers:
        if not layer.visible:
            continue
        top = layer.pixels / 255.0
        top_alpha = top[..., 3:]
        premultiplied = top[..., :3] * top_alpha + colour * alpha * (1 - top_alpha)
        alpha = top_alpha + alpha * (1 - top_alpha)
        colour = np.divide(premultiplied, alpha, out=np.zeros_like(premultiplied), where=alpha > 0)
    return np.round(255.0 * np.concatenate([colour, alpha], axis=-1)).astype(np.uint8)
