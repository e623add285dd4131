"""RGBA image maths around the transparent VAE, on [B,C,H,W] float tensors in [0,1].

- `pad_rgb`: the colour the offset encoder expects under transparent pixels, filled in from an
  alpha-weighted image pyramid (the reference's `pad_rgb`, which uses OpenCV's INTER_AREA and
  INTER_LINEAR resizes; both are reproduced here in torch).
- `split_image`: colour and alpha of an image with 1 to 4 channels, checked.
- `flatten_on_grey`: the RGB image the VAE encodes for an RGBA input (the grey is the family's).
- `checkerboard_preview`: RGBA shown over a checkerboard, for preview nodes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InputError
from .finite import IMAGE_CURE, require_finite

PYRAMID_STEP = 1.2


def _area_taps(src: int, dst: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights of OpenCV's INTER_AREA for shrinking `src` samples to `dst`.

    Each output sample averages the source interval it covers, weighting the partly covered
    source samples at both ends by the covered fraction. Returns [dst, K] index and weight tables.
    """
    scale = src / dst
    rows: list[list[tuple[int, float]]] = []
    for d in range(dst):
        start = d * scale
        end = start + scale
        cell = min(scale, src - start)
        first = math.ceil(start)
        last = min(math.floor(end), src - 1)
        first = min(first, last)
        taps = []
        if first - start > 1e-3:
            taps.append((first - 1, (first - start) / cell))
        taps += [(s, 1.0 / cell) for s in range(first, last)]
        if end - last > 1e-3:
            taps.append((last, min(end - last, 1.0, cell) / cell))
        rows.append(taps)
    width = max(len(t) for t in rows)
    index = torch.zeros(dst, width, dtype=torch.long)
    weight = torch.zeros(dst, width, dtype=torch.float64)
    for d, taps in enumerate(rows):
        for k, (s, w) in enumerate(taps):
            index[d, k] = s
            weight[d, k] = w
    return index, weight


def _area_resize_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    index, weight = _area_taps(x.shape[dim], size)
    index, weight = index.to(x.device), weight.to(device=x.device, dtype=x.dtype)
    gathered = x.index_select(dim, index.flatten())
    shape = list(x.shape)
    shape[dim : dim + 1] = list(index.shape)
    weight_shape = [1] * len(shape)
    weight_shape[dim : dim + 2] = list(weight.shape)
    return (gathered.view(shape) * weight.view(weight_shape)).sum(dim + 1)


def area_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Shrink [..., H, W] to [..., height, width] as cv2.resize(..., INTER_AREA) does."""
    return _area_resize_dim(_area_resize_dim(x, -2 % x.dim(), height), -1 % x.dim(), width)


def _alpha_pyramid(premultiplied: torch.Tensor, alpha: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Levels from coarsest (one side of 1 pixel) to the full image, each shrunk by PYRAMID_STEP."""
    levels = [(premultiplied, alpha)]
    while min(alpha.shape[-2:]) > 1:
        h, w = alpha.shape[-2:]
        size = (int(h / PYRAMID_STEP), int(w / PYRAMID_STEP))
        premultiplied, alpha = area_resize(premultiplied, *size), area_resize(alpha, *size)
        levels.append((premultiplied, alpha))
    return levels[::-1]


def pad_rgb(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Premultiplied colour plus, under (partly) transparent pixels, colour bled in from nearby
    opaque ones. rgb [B,3,H,W], alpha [B,1,H,W] -> [B,3,H,W]."""
    rgb, alpha = rgb.float(), alpha.float()
    levels = _alpha_pyramid(rgb * alpha, alpha)
    top_colour, top_alpha = levels[0]
    fill = top_colour.sum(dim=(-2, -1), keepdim=True) / top_alpha.sum(dim=(-2, -1), keepdim=True).clamp(1e-8, 1e32)
    for colour, level_alpha in levels:
        fill = F.interpolate(fill, size=colour.shape[-2:], mode="bilinear", align_corners=False)
        fill = colour + fill * (1.0 - level_alpha)
    return fill


def split_image(image: torch.Tensor, node: str, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Colour [B,3,H,W] and alpha [B,1,H,W] (None without one) of an image [B,H,W,C] whose C
    channels are grey, grey + alpha, RGB or RGBA (1 to 4, as PIL's L, LA, RGB, RGBA), as float32.
    Empty and non-finite images are refused. Alpha is clamped to [0,1]: it is a coverage, and
    resampling (lanczos, bicubic) overshoots it a little in ordinary workflows."""
    if image.dim() != 4 or not 1 <= image.shape[-1] <= 4:
        raise InputError(f"{node}: {what} has shape {list(image.shape)}; connect an IMAGE [B,H,W,C] of grey, "
                         "grey + alpha, RGB or RGBA pixels (C = 1 to 4)")
    if 0 in image.shape:
        raise InputError(f"{node}: {what} is empty (shape {list(image.shape)}); connect at least one image of at "
                         "least 1x1 pixels")
    require_finite(image, node, what, IMAGE_CURE)
    channels = image.shape[-1]
    colour = image[..., : 3 if channels >= 3 else 1].movedim(-1, 1).float()
    if colour.shape[1] == 1:
        colour = colour.repeat(1, 3, 1, 1)
    if channels in (2, 4):
        return colour, image[..., -1].unsqueeze(1).float().clamp(0, 1)
    return colour, None


def flatten_on_grey(rgb: torch.Tensor, alpha: torch.Tensor, grey: float) -> torch.Tensor:
    """The RGBA image composited over a flat `grey`: what the VAE sees of a transparent image."""
    return grey + (rgb - grey) * alpha


def checkerboard(height: int, width: int, square: int = 16, light: float = 0.8, dark: float = 0.6) -> torch.Tensor:
    """[height, width] checkerboard of `square`-pixel squares."""
    ys = torch.arange(height) // square
    xs = torch.arange(width) // square
    odd = (ys[:, None] + xs[None, :]) % 2
    return torch.where(odd.bool(), torch.tensor(dark), torch.tensor(light))


def checkerboard_preview(rgb: torch.Tensor, alpha: torch.Tensor, square: int = 16) -> torch.Tensor:
    """RGB [B,3,H,W] composited with alpha [B,1,H,W] over a checkerboard."""
    board = checkerboard(rgb.shape[-2], rgb.shape[-1], square).to(rgb)
    return rgb * alpha + board * (1.0 - alpha)
