"""Resizing RGBA images without fringes, by resampling or with an upscale model.

Straight (un-premultiplied) colour means nothing where alpha is 0, and often holds a colour that
is not in the image (black, or whatever the generator left there). Resampling straight colour
mixes it into the visible pixels along every edge: dark or foreign halos. So

- resampling filters colour premultiplied by alpha and alpha with the same weights and divides
  back: a visible pixel's colour is a weighted mean of visible colours only;
- an upscale model, which is non-linear and knows nothing of alpha, sees colour with the visible
  colours bled into the transparent pixels (`rgba.pad_rgb`), and upscales alpha as a grey image;
- pixels that end up fully transparent get that bled colour too, never black or garbage, so that
  a later re-encode (Layer Diffuse Encode) or an editor's "remove alpha" is clean.

Tensors are [B,C,H,W] float in [0,1]; colour has 3 channels, alpha 1 (1 = opaque).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import rgba
from .errors import InputError

# ComfyUI's names for its resampling methods, in its order.
RESAMPLE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
LANCZOS_LOBES = 3
# Alpha that rounds to 0 in an 8-bit file: such pixels are invisible and get bled colour.
INVISIBLE_ALPHA = 0.5 / 255


def output_size(height: int, width: int, scale_by: float, target_width: int = 0,
                target_height: int = 0) -> tuple[int, int]:
    """(height, width) to resize to, as ComfyUI's Upscale Image nodes decide it: both targets
    given, that size; one given, the other from the image's aspect ratio; neither, the image's
    size times `scale_by`."""
    if target_width > 0 and target_height > 0:
        return target_height, target_width
    if target_width > 0:
        return max(1, round(height * target_width / width)), target_width
    if target_height > 0:
        return target_height, max(1, round(width * target_height / height))
    if not scale_by > 0:
        raise InputError(f"scale_by is {scale_by}; set it above 0 or give a width or height")
    return max(1, round(height * scale_by)), max(1, round(width * scale_by))


def centre_crop_to_aspect(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centre of [..., H, W] with the aspect ratio of height x width, as ComfyUI's
    crop = "center" cuts it."""
    old_h, old_w = x.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    top = left = 0
    if old_aspect > new_aspect:
        left = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        top = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return x[..., top : old_h - top, left : old_w - left]


def _lanczos_taps(src: int, dst: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[dst, K] source indices and weights of a Lanczos-3 resize of `src` samples to `dst`.

    The filter is widened by the shrink factor when shrinking (antialiasing), each window is cut
    at the image border and its weights renormalised, as Pillow's LANCZOS does.
    """
    scale = src / dst
    stretch = max(scale, 1.0)
    support = LANCZOS_LOBES * stretch
    centre = (torch.arange(dst, dtype=torch.float64) + 0.5) * scale
    first = torch.floor(centre - support + 0.5).clamp(min=0)
    end = torch.floor(centre + support + 0.5).clamp(max=src)
    taps = int((end - first).max().item())
    index = first[:, None] + torch.arange(taps, dtype=torch.float64)[None]
    x = (index - centre[:, None] + 0.5) / stretch
    weight = torch.sinc(x) * torch.sinc(x / LANCZOS_LOBES) * (index < end[:, None]) * (x.abs() < LANCZOS_LOBES)
    weight = weight / weight.sum(dim=1, keepdim=True)
    return index.clamp(max=src - 1).long(), weight


def _lanczos_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if x.shape[dim] == size:
        return x
    index, weight = _lanczos_taps(x.shape[dim], size)
    index, weight = index.to(x.device), weight.to(device=x.device, dtype=x.dtype)
    view = [1] * x.dim()
    view[dim] = size
    out = None
    # One tap at a time: the gathered copy is the size of the output, not K times that.
    for k in range(index.shape[1]):
        term = x.index_select(dim, index[:, k]) * weight[:, k].view(view)
        out = term if out is None else out.add_(term)
    return out


def lanczos(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Lanczos-3 resize of [..., H, W] in float (ComfyUI's lanczos goes through 8-bit Pillow
    images, and Pillow premultiplies RGBA itself)."""
    return _lanczos_dim(_lanczos_dim(x, x.dim() - 1, width), x.dim() - 2, height)


def resample(x: torch.Tensor, height: int, width: int, method: str) -> torch.Tensor:
    """[B,C,H,W] resized to height x width with one of RESAMPLE_METHODS. nearest-exact, bilinear,
    area and bicubic are torch's, as ComfyUI's Upscale Image uses them, except that bilinear and
    bicubic are antialiased when shrinking (an upscale model's output brought down to the size
    asked for would alias otherwise)."""
    if method == "lanczos":
        return lanczos(x, height, width)
    if method in ("bilinear", "bicubic"):
        shrinking = height < x.shape[-2] or width < x.shape[-1]
        return F.interpolate(x, size=(height, width), mode=method, align_corners=False, antialias=shrinking)
    if method in ("nearest-exact", "area"):
        return F.interpolate(x, size=(height, width), mode=method)
    raise InputError(f"unknown resampling method {method!r}; use one of {', '.join(RESAMPLE_METHODS)}")


def resize_rgba(rgb: torch.Tensor, alpha: torch.Tensor, height: int, width: int,
                method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """RGBA resized premultiplied: (colour [B,3,height,width], alpha [B,1,height,width]).
    Invisible output pixels get the input's bled colour, resized the same way. Opaque images stay
    exactly opaque."""
    rgb, alpha = rgb.float(), alpha.float()
    if bool((alpha >= 1).all()):
        return resample(rgb, height, width, method).clamp(0, 1), alpha.new_ones(alpha.shape[0], 1, height, width)
    bled = rgba.pad_rgb(rgb, alpha)
    out = resample(torch.cat([rgb * alpha, alpha, bled], dim=1), height, width, method)
    premultiplied, new_alpha, new_bled = out[:, :3], out[:, 3:4], out[:, 4:]
    visible = new_alpha > INVISIBLE_ALPHA
    colour = torch.where(visible, premultiplied / torch.where(visible, new_alpha, 1.0), new_bled)
    return colour.clamp(0, 1), new_alpha.clamp(0, 1)


def upscale_rgba_with_model(rgb: torch.Tensor, alpha: torch.Tensor, model: Callable[[torch.Tensor], torch.Tensor],
                            height: int, width: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """RGBA upscaled by `model` (a 3-channel image [N,3,h,w] in [0,1] -> [N,3,h*s,w*s]), then
    resized premultiplied with `method` to height x width if the model's size differs.

    The model sees the colour bled into the transparent pixels and, in the same batch, alpha as a
    grey image; the mean of its three output channels is the new alpha. Opaque images stay opaque
    (a model's padding could darken alpha along the image's border), and their alpha is not run.
    """
    batch = rgb.shape[0]
    opaque = bool((alpha >= 1).all())
    bled = rgb.float().clamp(0, 1) if opaque else rgba.pad_rgb(rgb.float(), alpha.float()).clamp(0, 1)
    out = model(bled if opaque else torch.cat([bled, alpha.float().expand(-1, 3, -1, -1)])).float().clamp(0, 1)
    colour = out[:batch]
    new_alpha = torch.ones_like(colour[:, :1]) if opaque else out[batch:].mean(dim=1, keepdim=True)
    if tuple(out.shape[-2:]) == (height, width):
        return colour, new_alpha
    return resize_rgba(colour, new_alpha, height, width, method)

