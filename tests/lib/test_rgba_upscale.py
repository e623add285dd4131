"""RGBA resizing without fringes (lib_layerdiffuse.rgba_upscale), without ComfyUI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lib_layerdiffuse.errors import InputError
from lib_layerdiffuse.rgba_upscale import (
    INVISIBLE_ALPHA,
    RESAMPLE_METHODS,
    centre_crop_to_aspect,
    lanczos,
    output_size,
    resample,
    resize_rgba,
    upscale_rgba_with_model,
)

GREEN = torch.tensor([0.1, 0.8, 0.2]).view(1, 3, 1, 1)
MAGENTA = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)
VISIBLE = 0.05  # alpha above which a pixel's colour shows
TOLERANCE = 1e-3
MIXING_METHODS = ["bilinear", "bicubic", "lanczos"]  # the ones that blend neighbours when enlarging


def green_disc(size: int = 32, radius: float = 9.5) -> tuple[torch.Tensor, torch.Tensor]:
    """An antialiased green disc; the transparent pixels hold magenta."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    distance = ((ys - size / 2) ** 2 + (xs - size / 2) ** 2).sqrt()
    alpha = (radius + 0.5 - distance).clamp(0, 1).view(1, 1, size, size)
    rgb = torch.where(alpha > 0, GREEN, MAGENTA)
    return rgb, alpha


def fringe(rgb: torch.Tensor, alpha: torch.Tensor) -> float:
    """How far the colour of visible pixels strays from the disc's green."""
    visible = (alpha > VISIBLE).expand_as(rgb)
    assert visible.any() and not visible.all()
    return float((rgb - GREEN).abs()[visible].max())


def straight_resize(rgb, alpha, height, width, method):
    """What a plain resize of an RGBA image does: every channel on its own."""
    out = resample(torch.cat([rgb, alpha], dim=1), height, width, method)
    return out[:, :3].clamp(0, 1), out[:, 3:].clamp(0, 1)


# --- resizing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("method", RESAMPLE_METHODS)
def test_premultiplied_resize_leaves_no_fringe(method, scale):
    rgb, alpha = green_disc()
    out_rgb, out_alpha = resize_rgba(rgb, alpha, 32 * scale, 32 * scale, method)
    assert out_rgb.shape == (1, 3, 32 * scale, 32 * scale) and out_alpha.shape == (1, 1, 32 * scale, 32 * scale)
    assert fringe(out_rgb, out_alpha) < TOLERANCE
    assert out_rgb.min() >= 0 and out_rgb.max() <= 1 and out_alpha.min() >= 0 and out_alpha.max() <= 1


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("method", MIXING_METHODS)
def test_straight_resize_has_fringes(method, scale):
    """The check above catches the halo a straight-alpha resize makes."""
    rgb, alpha = green_disc()
    assert fringe(*straight_resize(rgb, alpha, 32 * scale, 32 * scale, method)) > 0.2


@pytest.mark.parametrize("method", RESAMPLE_METHODS)
def test_shrinking_leaves_no_fringe(method):
    rgb, alpha = green_disc(64, 20.5)
    assert fringe(*resize_rgba(rgb, alpha, 23, 23, method)) < TOLERANCE


@pytest.mark.parametrize("method", RESAMPLE_METHODS)
def test_invisible_pixels_get_bled_colour(method):
    rgb, alpha = green_disc()
    out_rgb, out_alpha = resize_rgba(rgb, alpha, 64, 64, method)
    invisible = (out_alpha <= INVISIBLE_ALPHA).expand_as(out_rgb)
    assert invisible.any()
    assert float((out_rgb - GREEN).abs()[invisible].max()) < TOLERANCE  # neither magenta nor black


@pytest.mark.parametrize("size", [(64, 96), (20, 24)])
@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic"])
def test_opaque_resize_is_torch_interpolate(method, size):
    rgb = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    out_rgb, out_alpha = resize_rgba(rgb, torch.ones(2, 1, 32, 48), *size, method)
    shrinking = size[0] < 32
    extra = {"align_corners": False, "antialias": shrinking} if method in ("bilinear", "bicubic") else {}
    reference = F.interpolate(rgb, size=size, mode=method, **extra).clamp(0, 1)
    torch.testing.assert_close(out_rgb, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_alpha, torch.ones_like(out_alpha), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(74, 106), (150, 40), (13, 20), (37, 53)])
def test_lanczos_matches_pillow_on_grey(size):
    grey = torch.rand(37, 53, generator=torch.Generator().manual_seed(1))
    height, width = size
    ours = lanczos(grey.view(1, 1, 37, 53), height, width)[0, 0].numpy()
    # Pillow in float: the same filter, no rounding.
    pil_float = np.asarray(Image.fromarray(grey.numpy(), mode="F").resize((width, height), Image.Resampling.LANCZOS))
    np.testing.assert_allclose(ours, pil_float, atol=1e-5)
    # Pillow on an 8-bit opaque grey RGB image. It rounds and clips after each pass, so the image
    # is smooth (no overshoot to clip) and the tolerance is two 8-bit steps.
    ys, xs = torch.meshgrid(torch.arange(37.0), torch.arange(53.0), indexing="ij")
    smooth = 0.5 + 0.3 * torch.sin(xs / 5) * torch.cos(ys / 7)
    grey8 = np.round(smooth.numpy() * 255).astype(np.uint8)
    pil8 = Image.fromarray(np.dstack([grey8] * 3), "RGB").resize((width, height), Image.Resampling.LANCZOS)
    ours8 = lanczos(torch.from_numpy(grey8 / 255.0).view(1, 1, 37, 53), height, width)[0, 0].numpy()
    np.testing.assert_allclose(ours8, np.asarray(pil8)[..., 0] / 255.0, atol=2 / 255)

def test_unknown_method_is_refused():
    with pytest.raises(InputError, match="lanczos"):
        resample(torch.zeros(1, 1, 4, 4), 8, 8, "bislerp")


# --- sizes --------------------------------------------------------------------------------------------

def test_output_size_rules():
    assert output_size(100, 200, 2.0) == (200, 400)
    assert output_size(100, 200, 1.5, target_width=300) == (150, 300)
    assert output_size(100, 200, 1.5, target_height=50) == (50, 100)
    assert output_size(100, 200, 1.5, 64, 48) == (48, 64)
    assert output_size(3, 3, 0.01) == (1, 1)
    with pytest.raises(InputError, match="scale_by"):
        output_size(100, 200, 0.0)


def test_centre_crop_keeps_the_middle():
    x = torch.arange(4 * 8).view(1, 1, 4, 8)
    torch.testing.assert_close(centre_crop_to_aspect(x, 10, 10), x[..., 2:6])
    torch.testing.assert_close(centre_crop_to_aspect(x, 1, 4), x[..., 1:3, :])
    torch.testing.assert_close(centre_crop_to_aspect(x, 2, 4), x)


# --- upscale models -----------------------------------------------------------------------------------

def nearest_2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def blur_2x(x: torch.Tensor) -> torch.Tensor:
    """Linear, mixes neighbours: nearest 2x, then a 5x5 box blur."""
    return F.avg_pool2d(F.pad(nearest_2x(x), (2, 2, 2, 2), mode="replicate"), 5, stride=1)


def max_2x(x: torch.Tensor) -> torch.Tensor:
    """Non-linear: nearest 2x, then the brightest value of every 3x3 neighbourhood."""
    return F.max_pool2d(nearest_2x(x), 3, stride=1, padding=1)


@pytest.mark.parametrize("size", [64, 48, 96])
@pytest.mark.parametrize("model", [nearest_2x, blur_2x, max_2x])
def test_model_upscale_leaves_no_fringe(model, size):
    rgb, alpha = green_disc()
    out_rgb, out_alpha = upscale_rgba_with_model(rgb, alpha, model, size, size, "lanczos")
    assert out_rgb.shape == (1, 3, size, size) and out_alpha.shape == (1, 1, size, size)
    assert fringe(out_rgb, out_alpha) < TOLERANCE
    invisible = (out_alpha <= INVISIBLE_ALPHA).expand_as(out_rgb)
    assert float((out_rgb - GREEN).abs()[invisible].max()) < TOLERANCE


@pytest.mark.parametrize("model", [blur_2x, max_2x])
def test_model_on_straight_colour_has_fringes(model):
    """The check above catches what a model does to straight colour."""
    rgb, alpha = green_disc()
    assert fringe(model(rgb), model(alpha.expand(-1, 3, -1, -1)).mean(1, keepdim=True)) > 0.2


def test_model_sees_colour_and_alpha_in_one_batch():
    rgb, alpha = green_disc()
    rgb, alpha = rgb.repeat(2, 1, 1, 1), alpha.repeat(2, 1, 1, 1)
    alpha[1] = 1.0
    seen = []

    def model(x):
        seen.append(x.shape)
        return nearest_2x(x)

    out_rgb, out_alpha = upscale_rgba_with_model(rgb, alpha, model, 64, 64, "bicubic")
    assert seen == [(4, 3, 32, 32)]
    torch.testing.assert_close(out_alpha, nearest_2x(alpha))
    torch.testing.assert_close(out_rgb[1:], nearest_2x(rgb[1:]))  # opaque: the model's output as it is


def test_opaque_images_stay_opaque_and_only_colour_is_run():
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = []

    def zero_padded_blur(x):  # darkens the border, as a model's zero padding can
        seen.append(x.shape)
        return F.avg_pool2d(nearest_2x(x), 3, stride=1, padding=1, count_include_pad=True)

    out_rgb, out_alpha = upscale_rgba_with_model(rgb, torch.ones(2, 1, 16, 16), zero_padded_blur, 32, 32, "lanczos")
    assert seen == [(2, 3, 16, 16)]
    assert torch.equal(out_alpha, torch.ones(2, 1, 32, 32))
    torch.testing.assert_close(out_rgb, zero_padded_blur(rgb).clamp(0, 1))


@pytest.mark.parametrize("method", ["lanczos", "bicubic", "area"])
def test_resampled_opaque_images_stay_exactly_opaque(method):
    rgb = torch.rand(1, 3, 6, 4, generator=torch.Generator().manual_seed(1))
    out_rgb, out_alpha = resize_rgba(rgb, torch.ones(1, 1, 6, 4), 8, 12, method)
    assert torch.equal(out_alpha, torch.ones(1, 1, 8, 12))
    torch.testing.assert_close(out_rgb, resample(rgb, 8, 12, method).clamp(0, 1))
