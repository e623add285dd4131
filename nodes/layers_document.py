"""Core's LAYERS documents (Add Layer, Create Layered Image; ComfyUI 0.31+) read as RGBA layers.

A document is {"version": 1, "canvas": (width, height) (optional), "layers": [item, ...]}; an item
holds an IMAGE (a batch is that many consecutive layers), an optional LoadImage-style mask that
multiplies the image's own alpha, a z_index (stable order), a placement (x, y, display w and h)
and a name, opacity, blend mode, visibility, flips and rotation. Without a canvas the document is
as large as its placed layers reach, as Create Layered Image sizes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..lib_layerdiffuse.errors import InputError
from .rgba_io import join_rgba, mask_alpha, split_rgba


@dataclass(frozen=True)
class Frame:
    """One layer of a document: colour [1,3,h,w], alpha [1,1,h,w] and where it goes on the canvas."""
    name: str
    rgb: torch.Tensor
    alpha: torch.Tensor
    x: int
    y: int
    size: tuple[int, int]  # displayed (height, width)
    visible: bool
    opacity: float
    flip_h: bool
    flip_v: bool


def _int(value, default: int = 0) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def document_items(document, node: str) -> list[dict]:
    """The document's raster items in stacking order (bottom first), or a clear error."""
    if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
        raise InputError(f"{node}: layers is not a LAYERS document; connect Add Layer's or Save Layers' LAYERS output")
    if document.get("version", 1) != 1:
        raise InputError(f"{node}: LAYERS document version {document['version']!r} is not supported; "
                         "update the pack")
    items = []
    for index, item in enumerate(document["layers"]):
        if not isinstance(item, dict) or not isinstance(item.get("image"), torch.Tensor):
            raise InputError(f"{node}: layer {index + 1} of the LAYERS document holds no image")
        if item.get("type", "raster") != "raster":
            raise InputError(f"{node}: layer {index + 1} is of type {item['type']!r}; only raster layers are supported")
        items.append(item)
    if not items:
        raise InputError(f"{node}: the LAYERS document has no layers; add one with Add Layer")
    return sorted(items, key=lambda item: _int(item.get("z_index")))


def item_rgba(item: dict, node: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour [B,3,h,w], alpha [B,1,h,w]) of an item: the image's alpha (opaque if RGB) times
    1 - its mask."""
    image, mask = item["image"], item.get("mask")
    rgb, alpha = split_rgba(image, None, node, "a layer's image")
    if isinstance(mask, torch.Tensor):
        batch, _, height, width = alpha.shape
        alpha = alpha * mask_alpha(mask, batch, height, width, node, "a layer's mask").to(alpha.device)
    return rgb, alpha


def document_frames(document, node: str) -> tuple[tuple[int, int], list[Frame]]:
    """((height, width) of the canvas, the layers bottom to top). Every layer must be composited
    in normal mode and unrotated: a layered file of other blend modes or rotations would not show
    what Create Layered Image shows."""
    frames = []
    for item in document_items(document, node):
        name = item.get("name") if isinstance(item.get("name"), str) and item.get("name") else f"layer {len(frames) + 1}"
        if item.get("blend_mode", "normal") != "normal":
            raise InputError(f"{node}: layer {name!r} has blend mode {item['blend_mode']!r}; only normal layers can be "
                             "saved alike in PSD and OpenRaster: set blend_mode to normal in its Add Layer")
        if float(item.get("rotation") or 0.0) != 0.0:
            raise InputError(f"{node}: layer {name!r} is rotated; set rotation to 0 in its Add Layer (or save Create "
                             "Layered Image's output)")
        rgb, alpha = item_rgba(item, node)
        height, width = rgb.shape[-2:]
        size = (_int(item.get("h")) or height, _int(item.get("w")) or width)
        opacity = float(item.get("opacity", 1.0))
        for i in range(rgb.shape[0]):
            frames.append(Frame(name if rgb.shape[0] == 1 else f"{name} {i + 1}", rgb[i : i + 1], alpha[i : i + 1],
                                _int(item.get("x")), _int(item.get("y")), size, bool(item.get("visible", True)),
                                min(max(opacity, 0.0), 1.0), bool(item.get("flip_h")), bool(item.get("flip_v"))))
    canvas = document.get("canvas")
    if isinstance(canvas, (tuple, list)) and len(canvas) == 2 and _int(canvas[0]) > 0 and _int(canvas[1]) > 0:
        return (_int(canvas[1]), _int(canvas[0])), frames
    return (max(1, *(f.y + f.size[0] for f in frames)), max(1, *(f.x + f.size[1] for f in frames))), frames


def scale_document(document, factor: float, node: str,
                   resize: Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], tuple[torch.Tensor, torch.Tensor]]
                   ) -> dict:
    """The document with every item's image resized by `resize` (colour, alpha, (height, width))
    to `factor` times its size, as RGBA with its mask folded into alpha, and every placement and
    the canvas scaled alike. Everything else an item holds is kept."""
    def scaled(value) -> int:
        return round(value * factor)

    items = []
    for item in document_items(document, node):
        rgb, alpha = item_rgba(item, node)
        height, width = rgb.shape[-2:]
        rgb, alpha = resize(rgb, alpha, (max(1, scaled(height)), max(1, scaled(width))))
        new = {key: value for key, value in item.items() if key != "mask"}
        new["image"] = join_rgba(rgb, alpha)
        for key in ("x", "y", "w", "h"):
            if key in item:
                new[key] = max(1, scaled(_int(item[key]))) if key in ("w", "h") else scaled(_int(item[key]))
        items.append(new)
    out = {**document, "layers": items}
    if "canvas" in document:
        canvas = document["canvas"]
        out["canvas"] = (max(1, scaled(_int(canvas[0]))), max(1, scaled(_int(canvas[1]))))
    return out
