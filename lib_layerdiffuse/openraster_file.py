"""OpenRaster documents (.ora) of a layer stack, for Krita, GIMP, MyPaint and other editors.

An OpenRaster file is a zip: `mimetype` first and stored uncompressed (so that the type can be
read at a fixed offset), `stack.xml` (the layer stack, topmost layer first), one PNG per layer
under `data/`, the composite as `mergedimage.png` and a thumbnail of at most 256x256 pixels as
`Thumbnails/thumbnail.png`. PNGs hold straight alpha.
"""
from __future__ import annotations

import io
import zipfile
from xml.etree import ElementTree

import numpy as np
from PIL import Image

from .layer_stack import Layer, check_stack, composite

MIMETYPE = "image/openraster"
SPEC_VERSION = "0.0.5"
THUMBNAIL_SIDE = 256


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG", compress_level=4)
    return buffer.getvalue()


def _stack_xml(layers: list[Layer], sources: list[str], height: int, width: int) -> bytes:
    image = ElementTree.Element("image", version=SPEC_VERSION, w=str(width), h=str(height))
    stack = ElementTree.SubElement(image, "stack")
    for layer, source in reversed(list(zip(layers, sources))):
        ElementTree.SubElement(stack, "layer", name=layer.name, src=source, x="0", y="0", opacity=f"{layer.opacity:.3f}",
                               visibility="visible" if layer.visible else "hidden",
                               **{"composite-op": "svg:src-over"})
    return ElementTree.tostring(image, encoding="UTF-8", xml_declaration=True)


def ora_bytes(layers: list[Layer]) -> bytes:
    """An OpenRaster file of `layers` (bottom to top), all of one size."""
    height, width = check_stack(layers)
    sources = [f"data/layer{i}.png" for i in range(len(layers))]
    merged = composite(layers)
    thumbnail = Image.fromarray(merged, "RGBA")
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as ora:
        ora.writestr(zipfile.ZipInfo("mimetype"), MIMETYPE, compress_type=zipfile.ZIP_STORED)
        ora.writestr("stack.xml", _stack_xml(layers, sources, height, width))
        for layer, source in zip(layers, sources):
            # PNG data is compressed already.
            ora.writestr(source, _png(layer.pixels), compress_type=zipfile.ZIP_STORED)
        ora.writestr("mergedimage.png", _png(merged), compress_type=zipfile.ZIP_STORED)
        ora.writestr("Thumbnails/thumbnail.png", _png(np.asarray(thumbnail)), compress_type=zipfile.ZIP_STORED)
    return buffer.getvalue()


def write_ora(path: str, layers: list[Layer]) -> None:
    with open(path, "wb") as f:
        f.write(ora_bytes(layers))
