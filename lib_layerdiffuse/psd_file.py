"""Photoshop documents (PSD, version 1) of a layer stack, for Photoshop, Krita, GIMP and Photopea.

The file is 8-bit RGB at the stack's size. Every layer is a pixel layer over the whole canvas with
four channels (red, green, blue, and the transparency channel, id -1) holding straight alpha, a
Pascal name and a Unicode name ('luni'), its opacity and its visibility. Channels are PackBits-compressed.

The merged image (what viewers without layer support show) has a fourth channel for the
composite's transparency, which the spec signals by a negative layer count; its colour is matted
over white where the composite is transparent, the convention Photoshop writes and readers such as
psd-tools undo.

Channel data is written in the order red, green, blue, alpha, each channel ending on an even file
offset: both are what Pillow's PSD reader assumes, and both are valid PSD.
"""
from __future__ import annotations

import struct

import numpy as np

from .errors import InputError
from .layer_stack import Layer, check_stack, composite
from .packbits import encode_plane

MAX_SIDE = 30000  # PSD version 1; larger documents need the PSB format
RGB_MODE = 3
RLE = 1
CHANNEL_IDS = (0, 1, 2, -1)  # red, green, blue, transparency: the order of the pixels' planes
FLAG_HIDDEN = 0x02
FLAG_PS5 = 0x08  # bit 4 ("pixel data irrelevant") carries information; it is 0 here


def _pascal_name(name: str) -> bytes:
    """The legacy layer name: length byte and Latin-1 text, padded to a multiple of 4 bytes."""
    text = name.encode("latin-1", "replace")[:255]
    data = bytes([len(text)]) + text
    return data + b"\0" * (-len(data) % 4)


def _unicode_name(name: str) -> bytes:
    """The 'luni' additional layer information block: the full name in UTF-16."""
    text = name.encode("utf-16-be")
    data = struct.pack(">I", len(text) // 2) + text
    data += b"\0" * (-len(data) % 4)
    return b"8BIM" + b"luni" + struct.pack(">I", len(data)) + data


def _channel_data(plane: np.ndarray) -> bytes:
    counts, data = encode_plane(plane, even=True)
    return struct.pack(">H", RLE) + counts.astype(">u2").tobytes() + data


def _layer_record(layer: Layer, channel_lengths: list[int]) -> bytes:
    height, width = layer.pixels.shape[:2]
    record = struct.pack(">iiiiH", 0, 0, height, width, len(CHANNEL_IDS))
    record += b"".join(struct.pack(">hI", cid, length) for cid, length in zip(CHANNEL_IDS, channel_lengths))
    flags = FLAG_PS5 | (0 if layer.visible else FLAG_HIDDEN)
    record += b"8BIM" + b"norm" + struct.pack(">BBBB", round(255 * layer.opacity), 0, flags, 0)
    extra = struct.pack(">II", 0, 0) + _pascal_name(layer.name) + _unicode_name(layer.name)
    return record + struct.pack(">I", len(extra)) + extra


def _layer_info(layers: list[Layer]) -> bytes:
    records, channels = [], []
    for layer in layers:
        data = [_channel_data(layer.pixels[..., i]) for i in range(len(CHANNEL_IDS))]
        records.append(_layer_record(layer, [len(d) for d in data]))
        channels.extend(data)
    # A negative count: the merged image's extra channel is the composite's transparency.
    info = struct.pack(">h", -len(layers)) + b"".join(records) + b"".join(channels)
    return info + b"\0" * (len(info) % 2)


def _merged_image(pixels: np.ndarray) -> bytes:
    """The image data section: the composite, colour matted over white, then its alpha."""
    alpha = pixels[..., 3:].astype(np.uint32)
    matted = (pixels[..., :3].astype(np.uint32) * alpha + 255 * (255 - alpha) + 127) // 255
    planes = [matted[..., i].astype(np.uint8) for i in range(3)] + [pixels[..., 3]]
    encoded = [encode_plane(plane) for plane in planes]
    counts = b"".join(c.astype(">u2").tobytes() for c, _ in encoded)
    return struct.pack(">H", RLE) + counts + b"".join(data for _, data in encoded)


def psd_bytes(layers: list[Layer]) -> bytes:
    """A PSD file of `layers` (bottom to top), all of one size, with their composite as the
    merged image."""
    height, width = check_stack(layers)
    if max(height, width) > MAX_SIDE:
        raise InputError(f"a PSD file is at most {MAX_SIDE} pixels on a side; this image is {width}x{height}")
    if len(layers) > 2 ** 15 - 1:
        raise InputError(f"a PSD file holds at most {2 ** 15 - 1} layers")
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, len(CHANNEL_IDS), height, width, 8, RGB_MODE)
    colour_mode_data = image_resources = struct.pack(">I", 0)
    layer_info = _layer_info(layers)
    global_mask = struct.pack(">I", 0)
    layers_and_masks = struct.pack(">I", len(layer_info)) + layer_info + global_mask
    return (header + colour_mode_data + image_resources + struct.pack(">I", len(layers_and_masks))
            + layers_and_masks + _merged_image(composite(layers)))


def write_psd(path: str, layers: list[Layer]) -> None:
    with open(path, "wb") as f:
        f.write(psd_bytes(layers))
