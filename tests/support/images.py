"""Test images the nodes get as ComfyUI IMAGE tensors or as PNG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def rgba_disc(height: int = 64, width: int = 96) -> torch.Tensor:
    """[1,H,W,4]: a red-orange disc with a soft 4-pixel edge on a transparent background, its
    blue channel a horizontal ramp (so colours vary inside the disc)."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    radius = ((ys - height / 2) ** 2 + (xs - width / 2) ** 2).sqrt()
    alpha = 1 - (radius - 0.3125 * min(height, width)).clamp(0, 4) / 4
    colour = torch.stack([torch.ones_like(alpha), 0.2 * torch.ones_like(alpha), xs / width], -1)
    return torch.cat([colour, alpha[..., None]], -1)[None].float()


def save_rgba_png(image: torch.Tensor, path: Path) -> Path:
    """The first image of an RGBA IMAGE batch as an 8-bit RGBA PNG."""
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8), "RGBA").save(path)
    return path
