"""PSD and OpenRaster writers (lib_layerdiffuse.psd_file, .openraster_file, .packbits), read back
by independent readers: psd-tools, Pillow's PSD plugin, zipfile + Pillow."""
from __future__ import annotations

import io
import struct
import zipfile
from xml.etree import ElementTree

import numpy as np
import pytest
from PIL import Image

from lib_layerdiffuse.errors import InputError
from lib_layerdiffuse.layer_stack import Layer, composite
from lib_layerdiffuse.openraster_file import ora_bytes
from lib_layerdiffuse.packbits import encode_plane
from lib_layerdiffuse.psd_file import psd_bytes

import psd_tools  # noqa: E402  (a test requirement, tests/requirements.txt: an independent PSD reader)
from psd_tools.compression import rle  # noqa: E402


def layer_stack(height: int = 37, width: int = 51, seed: int = 0) -> list[Layer]:
    """Opaque background, a foreground with every alpha value, a hidden opaque blended image."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    background[..., 3] = 255
    foreground = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    foreground[: height // 3, :, 3] = 0  # a fully transparent band, and flat runs for PackBits
    foreground[: height // 3, : width // 2, :3] = 7
    blended = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    blended[..., 3] = 255
    return [Layer("background", background), Layer("foreground", foreground),
            Layer("blended ✓é", blended, visible=False)]


# --- PackBits -------------------------------------------------------------------------------------

@pytest.mark.parametrize("even", [False, True])
def test_packbits_rows_decode_with_psd_tools(even):
    rng = np.random.default_rng(3)
    planes = [rng.integers(0, 256, (5, 300)), rng.integers(0, 2, (6, 257)), np.full((3, 1000), 9),
              np.repeat(rng.integers(0, 3, (4, 40)), 7, axis=1), rng.integers(0, 256, (7, 1)),
              rng.integers(0, 2, (2, 2))]
    odd_seen = False
    for plane in planes:
        plane = plane.astype(np.uint8)
        counts, data = encode_plane(plane, even=even)
        assert counts.dtype == np.uint16 and counts.shape == (plane.shape[0],) and int(counts.sum()) == len(data)
        odd_seen |= len(data) % 2 == 1
        if even:
            assert len(data) % 2 == 0
        offset = 0
        for row, count in zip(plane, counts):
            assert bytes(rle.decode(data[offset : offset + count], plane.shape[1])) == row.tobytes()
            offset += int(count)
    assert odd_seen != even  # the planes do give odd totals unless asked for even ones


def test_packbits_compresses_flat_rows():
    counts, data = encode_plane(np.zeros((2, 1000), dtype=np.uint8))
    assert list(counts) == [16, 16] and data[:2] == bytes([129, 0])  # 8 repeats of 128 per row


# --- composite --------------------------------------------------------------------------------------

def test_composite_is_over_of_visible_layers():
    background = np.zeros((1, 2, 4), dtype=np.uint8)
    background[0, 0] = (200, 100, 0, 255)
    background[0, 1] = (0, 0, 0, 0)
    foreground = np.zeros((1, 2, 4), dtype=np.uint8)
    foreground[..., :] = (0, 0, 255, 51)  # 20% blue
    hidden = np.full((1, 2, 4), 255, dtype=np.uint8)
    merged = composite([Layer("bg", background), Layer("fg", foreground), Layer("top", hidden, visible=False)])
    np.testing.assert_array_equal(merged[0, 0], (160, 80, 51, 255))
    np.testing.assert_array_equal(merged[0, 1], (0, 0, 255, 51))


def test_layers_of_another_size_are_refused():
    layers = layer_stack()
    layers.append(Layer("small", np.zeros((3, 3, 4), dtype=np.uint8)))
    with pytest.raises(InputError, match="small"):
        psd_bytes(layers)
    with pytest.raises(InputError, match="small"):
        ora_bytes(layers)


# --- PSD ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(37, 51), (1, 1), (16, 2)])
def test_psd_reads_back_with_psd_tools(size):
    layers = layer_stack(*size)
    psd = psd_tools.PSDImage.open(io.BytesIO(psd_bytes(layers)))
    assert (psd.width, psd.height, psd.depth, psd.channels) == (size[1], size[0], 8, 4)
    assert psd.color_mode == psd_tools.constants.ColorMode.RGB
    assert psd._record.layer_and_mask_information.layer_info.layer_count == -len(layers)  # merged alpha
    assert [layer.name for layer in psd] == [layer.name for layer in layers]  # the Unicode names
    assert [layer.visible for layer in psd] == [True, True, False]
    for read, saved in zip(psd, layers):
        assert read.bbox == (0, 0, size[1], size[0]) and read.kind == "pixel"
        assert read.opacity == 255 and read.blend_mode == psd_tools.constants.BlendMode.NORMAL
        np.testing.assert_array_equal(np.asarray(read.topil()), saved.pixels)
    merged, expected = np.asarray(psd.topil()).astype(int), composite(layers).astype(int)
    np.testing.assert_array_equal(merged[..., 3], expected[..., 3])
    shown = expected[..., 3] > 0  # colour under alpha 0 is not defined
    assert np.abs(merged - expected)[shown].max() <= 1


def test_psd_reads_back_with_pillow():
    layers = layer_stack()
    image = Image.open(io.BytesIO(psd_bytes(layers)))
    assert image.format == "PSD" and image.mode == "RGBA" and image.size == (51, 37)
    assert [(name, mode, bbox) for name, mode, bbox, _ in image.layers] == [
        ("background", "RGBA", (0, 0, 51, 37)), ("foreground", "RGBA", (0, 0, 51, 37)),
        ("blended ?é", "RGBA", (0, 0, 51, 37))]  # Pillow reads the Latin-1 name
    # The merged image, colour matted over white as Photoshop stores it.
    merged, expected = np.asarray(image).astype(int), composite(layers).astype(int)
    alpha = expected[..., 3:]
    np.testing.assert_array_equal(merged[..., 3], expected[..., 3])
    assert np.abs(merged[..., :3] - (expected[..., :3] * alpha + 255 * (255 - alpha)) / 255).max() <= 1
    # Pillow's frames 1..n are the layers; it does not re-seek the frame it opened on, so go down.
    for index in range(len(layers), 0, -1):
        image.seek(index)
        np.testing.assert_array_equal(np.asarray(image), layers[index - 1].pixels)


def test_psd_header_and_sections():
    data = psd_bytes(layer_stack())
    signature, version, channels, height, width, depth, mode = struct.unpack(">4sH6xHIIHH", data[:26])
    assert (signature, version, channels, height, width, depth, mode) == (b"8BPS", 1, 4, 37, 51, 8, 3)
    colour_data, resources, layers_and_masks, layer_info = struct.unpack(">IIII", data[26:42])
    assert colour_data == 0 and resources == 0 and layer_info % 2 == 0 and layers_and_masks == layer_info + 8
    assert struct.unpack(">h", data[42:44])[0] == -3
    image_data = 38 + layers_and_masks
    assert struct.unpack(">H", data[image_data : image_data + 2])[0] == 1  # PackBits


# --- OpenRaster ---------------------------------------------------------------------------------------

def test_ora_reads_back_with_zipfile_and_pillow():
    layers = layer_stack(300, 200)
    data = ora_bytes(layers)
    # mimetype: the first entry, stored, readable at a fixed offset.
    assert data[30:38] == b"mimetype" and data[38:54] == b"image/openraster"
    with zipfile.ZipFile(io.BytesIO(data)) as ora:
        first = ora.infolist()[0]
        assert first.filename == "mimetype" and first.compress_type == zipfile.ZIP_STORED
        assert ora.read("mimetype") == b"image/openraster"
        assert ora.testzip() is None
        root = ElementTree.fromstring(ora.read("stack.xml"))
        assert root.tag == "image" and (root.get("w"), root.get("h")) == ("200", "300")
        entries = root.find("stack").findall("layer")
        assert [e.get("name") for e in entries] == ["blended ✓é", "foreground", "background"]  # top first
        assert [e.get("visibility") for e in entries] == ["hidden", "visible", "visible"]
        for entry, saved in zip(entries, reversed(layers)):
            assert (entry.get("x"), entry.get("y"), entry.get("composite-op")) == ("0", "0", "svg:src-over")
            png = Image.open(io.BytesIO(ora.read(entry.get("src"))))
            assert png.format == "PNG" and png.mode == "RGBA"
            np.testing.assert_array_equal(np.asarray(png), saved.pixels)
        merged = Image.open(io.BytesIO(ora.read("mergedimage.png")))
        np.testing.assert_array_equal(np.asarray(merged), composite(layers))
        thumbnail = Image.open(io.BytesIO(ora.read("Thumbnails/thumbnail.png")))
        assert thumbnail.size == (171, 256)


# --- placement and opacity --------------------------------------------------------------------------

def test_place_on_canvas_resizes_premultiplied_flips_and_cuts():
    import torch

    from lib_layerdiffuse.layer_stack import place_on_canvas

    rgb = torch.zeros(1, 3, 2, 4)
    rgb[..., :2] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # red left half
    rgb[..., 2:] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]  # blue right half, under alpha 0
    alpha = torch.zeros(1, 1, 2, 4)
    alpha[..., :2] = 1
    _, exact = place_on_canvas(rgb, alpha, (5, 6), x=-1, y=2, size=(4, 8), flip_h=True, method="nearest-exact")
    assert exact.shape == (1, 1, 5, 6) and not exact[..., :2, :].any()  # above the layer
    # Flipped: the opaque half is now on the right, columns 4..7 of the layer = canvas 3..5 (cut at 6).
    assert torch.equal(exact[0, 0, 2:, 3:], torch.ones(3, 3)) and not exact[..., :, :3].any()
    out_rgb, out_alpha = place_on_canvas(rgb, alpha, (5, 6), x=-1, y=2, size=(4, 8), flip_h=True)
    assert out_rgb.shape == (1, 3, 5, 6) and not out_alpha[..., :2, :].any()
    shown = out_alpha[0, 0] > 0.5 / 255
    assert float((out_rgb[0, :, shown] - torch.tensor([1.0, 0.0, 0.0])[:, None]).abs().max()) < 1e-5


def test_opacity_reaches_psd_ora_and_the_composite():
    background = np.zeros((2, 3, 4), dtype=np.uint8)
    background[...] = (0, 0, 0, 255)
    top = np.full((2, 3, 4), 255, dtype=np.uint8)
    layers = [Layer("bg", background), Layer("half", top, opacity=0.5)]
    np.testing.assert_array_equal(composite(layers)[0, 0], (128, 128, 128, 255))
    psd = psd_tools.PSDImage.open(io.BytesIO(psd_bytes(layers)))
    assert [(layer.name, layer.opacity) for layer in psd] == [("bg", 255), ("half", 128)]
    with zipfile.ZipFile(io.BytesIO(ora_bytes(layers))) as ora:
        stack = ElementTree.fromstring(ora.read("stack.xml"))
    assert [(e.get("name"), e.get("opacity")) for e in stack.iter("layer")] == [("half", "0.500"), ("bg", "1.000")]
    with pytest.raises(InputError, match="opacity"):
        psd_bytes([Layer("bad", top, opacity=1.5)])
