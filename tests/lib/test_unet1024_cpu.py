"""The CPU executor of the transparent decoder against the network itself: same output across
sizes, dtypes and batches, reused storages, the structure check, probes, the pieces."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib_layerdiffuse import transparent_vae, unet1024, unet1024_cpu
from lib_layerdiffuse.unet1024 import ResnetBlock, SpatialSelfAttention, UNet1024, Upsample
from lib_layerdiffuse.unet1024_cpu import (CpuExecutor, Storages, UnknownNetworkError, check_structure, conv_add_,
                                           conv_into, fused_sum_dtypes, group_norm, precise_group_norm,
                                           subpixel_kernel, upsample)
from lib_layerdiffuse.weight_files import build_model

# The paper's layout with fewer channels per block (still multiples of the norm groups and the
# attention head size): the same structure, so that the executor runs it, at a fraction of the cost.
NARROW_CHANNELS = (8, 8, 16, 16, 16, 32, 32)
HALF_DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture
def narrow(monkeypatch):
    monkeypatch.setattr(unet1024, "BLOCK_CHANNELS", NARROW_CHANNELS)
    monkeypatch.setattr(unet1024_cpu, "BLOCK_CHANNELS", NARROW_CHANNELS)


@pytest.fixture
def precise_norm_on_small_maps(monkeypatch):
    """The precise GroupNorm (and its storage) from 64x64 pixels up instead of 512x512."""
    monkeypatch.setattr(unet1024_cpu, "PRECISE_NORM_PIXELS", 64 * 64)


def random_state_dict(latent_channels: int = 4) -> dict:
    torch.manual_seed(0)
    return UNet1024(latent_channels).state_dict()


def network(state_dict: dict, dtype: torch.dtype = torch.float32) -> UNet1024:
    return build_model(lambda: UNet1024(state_dict["latent_conv_in.weight"].shape[1]), state_dict, "test", dtype=dtype)


def inputs(batch: int, height: int, width: int, latent_channels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(height * width + batch)
    return (torch.rand(batch, 3, height, width, generator=generator),
            torch.randn(batch, latent_channels, height // 8, width // 8, generator=generator))


def plain(model: UNet1024, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(pixel, latent)


def assert_as_close(model: UNet1024, pixel: torch.Tensor, latent: torch.Tensor, exact: torch.Tensor) -> None:
    """The executor is as close to `exact` (the network in a higher precision) as the network
    itself in the model's dtype is (both round, in different orders)."""
    out = CpuExecutor(model)(pixel, latent)
    assert out.dtype == model.compute_dtype and out.shape == exact.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    ours, theirs = ((t.double() - exact).abs() for t in (out, plain(model, pixel, latent)))
    assert ours.mean() <= 1.1 * theirs.mean()
    if model.compute_dtype == torch.float32:
        # float32 rounding in whatever order a CPU's kernels sum; a wrong weight or step is orders larger.
        assert ours.max() < 2e-5
    else:
        assert ours.max() <= 1.5 * theirs.max()


@pytest.mark.parametrize("batch,height,width", [(1, 64, 64), (2, 64, 128), (1, 128, 192)])
def test_executor_matches_the_network(narrow, precise_norm_on_small_maps, batch, height, width):
    """Against the float64 network: the executor is at least about as close to it as torch's own
    layers in the same dtype (its float32 GroupNorm is the more precise one)."""
    state_dict = random_state_dict()
    pixel, latent = inputs(batch, height, width)
    exact = plain(network(state_dict, torch.float64), pixel, latent)
    for dtype in [torch.float32] + HALF_DTYPES:
        assert_as_close(network(state_dict, dtype), pixel, latent, exact)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_executor_without_fused_sums_matches_the_network(narrow, precise_norm_on_small_maps, monkeypatch, dtype):
    """Where oneDNN cannot add into a tensor (an older CPU or build; float64 always) the
    executor falls back to plain convolutions."""
    def fused_sum(*args):
        raise AssertionError("oneDNN's fused sum called for a dtype it was not offered")

    monkeypatch.setattr(unet1024_cpu, "fused_sum_dtypes", lambda: frozenset())
    monkeypatch.setattr(unet1024_cpu, "_conv_sum_", fused_sum)
    state_dict = random_state_dict()
    pixel, latent = inputs(2, 64, 128)
    exact = plain(network(state_dict, torch.float64), pixel, latent)
    model = network(state_dict, dtype)
    if dtype == torch.float64:
        torch.testing.assert_close(CpuExecutor(model)(pixel, latent), exact, atol=1e-12, rtol=0)
    else:
        assert_as_close(model, pixel, latent, exact)


@pytest.fixture(scope="module")
def full_size_state_dict():
    return random_state_dict()


@pytest.mark.parametrize("dtype,batch,height,width", [(torch.float32, 2, 64, 128), (torch.bfloat16, 1, 64, 64)])
def test_executor_matches_the_full_size_network(full_size_state_dict, dtype, batch, height, width):
    state_dict = full_size_state_dict
    pixel, latent = inputs(batch, height, width)
    model = network(state_dict, dtype)
    if dtype == torch.float32:  # maps below PRECISE_NORM_PIXELS: the same kernels, summed in other orders
        torch.testing.assert_close(CpuExecutor(model)(pixel, latent), plain(model, pixel, latent), atol=1e-5, rtol=0)
    else:  # the float32 network as the reference
        assert_as_close(model, pixel, latent, plain(network(state_dict), pixel, latent).double())


def test_executor_runs_the_flux_decoder(narrow):
    state_dict = random_state_dict(latent_channels=16)
    pixel, latent = inputs(1, 64, 64, latent_channels=16)
    model = network(state_dict)
    torch.testing.assert_close(CpuExecutor(model)(pixel, latent), plain(model, pixel, latent), atol=1e-5, rtol=0)


def test_reused_storages_give_the_same_output(narrow, precise_norm_on_small_maps):
    model = network(random_state_dict())
    executor = CpuExecutor(model)
    pixel, latent = inputs(1, 64, 128)
    larger = inputs(2, 128, 192)
    first = executor(pixel, latent)
    kept = first.clone()
    other = executor(*larger)  # grows every storage
    again = executor(pixel, latent)  # in storages that held another input's maps
    assert torch.equal(again, kept) and torch.equal(first, kept)  # and the first output is untouched
    assert torch.equal(executor(*larger), other)
    assert torch.equal(CpuExecutor(model)(pixel, latent), kept)


def test_decode_uses_the_executor_on_the_cpu_only(narrow, monkeypatch):
    made = []

    class Recording(CpuExecutor):
        def __init__(self, model):
            super().__init__(model)
            made.append(self)

    monkeypatch.setattr(transparent_vae, "CpuExecutor", Recording)
    model = network(random_state_dict())
    pixel, latent = inputs(1, 64, 64)
    transparent_vae.decode_augmented_passes(model, pixel, latent, passes=4)
    assert len(made) == 1  # one executor (one set of storages) for all the passes of a decode
    with torch.device("meta"):
        meta_model = UNet1024()
    monkeypatch.setattr(transparent_vae, "require_finite", lambda *_: None)  # a meta tensor holds no values
    out = transparent_vae.decode_augmented_passes(meta_model, pixel.to("meta"), latent.to("meta"), passes=4)
    assert out.shape == (4, 1, 4, 64, 64) and len(made) == 1  # any other device: the network itself


# --- the structure check ---------------------------------------------------------------------------

def _subclassed_upsample(model):
    class Upsample2(Upsample):
        pass

    model.up_blocks[0].upsamplers[0] = Upsample2(512)


CHANGES = {
    "norm1 replaced": (lambda m: setattr(m.down_blocks[1].resnets[0], "norm1", nn.BatchNorm2d(32)),
                       "down_blocks.1.resnets.0.norm1"),
    "a subclass": (_subclassed_upsample, "up_blocks.0.upsamplers.0"),
    "a resnet added": (lambda m: m.down_blocks[0].resnets.append(ResnetBlock(32, 32)), "down_blocks.0.resnets"),
    "attention added": (lambda m: setattr(m.down_blocks[0], "attentions",
                                          nn.ModuleList([SpatialSelfAttention(32), SpatialSelfAttention(32)])),
                        "down_blocks.0"),
    "upsampling at the end": (lambda m: setattr(m.up_blocks[6], "upsamplers", nn.ModuleList([Upsample(32)])),
                              "up_blocks.6.upsamplers"),
    "a down block removed": (lambda m: m.down_blocks.pop(2), "down_blocks"),
    "padding changed": (lambda m: setattr(m.up_blocks[2].upsamplers[0].conv, "padding", (0, 0)),
                        "up_blocks.2.upsamplers.0.conv"),
    "latent injected elsewhere": (lambda m: setattr(m, "latent_conv_in", nn.Conv2d(4, 128, 1)), "latent_conv_in"),
    "a module added": (lambda m: setattr(m.mid_block, "dropout", nn.Dropout(0.1)), "mid_block.dropout"),
    "a parameter added": (lambda m: m.up_blocks[1].resnets[0].register_parameter("scale", nn.Parameter(torch.ones(1))),
                          "up_blocks.1.resnets.0"),
    "a norm without affine": (lambda m: setattr(m, "conv_norm_out", nn.GroupNorm(4, 32, affine=False)),
                              "conv_norm_out"),
    "a layer with a tensor of its own": (lambda m: m.conv_out.register_buffer("scale", torch.ones(1)), "conv_out"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_structure_check_refuses_a_changed_network(change):
    modify, where = CHANGES[change]
    with torch.device("meta"):
        model = UNet1024()
        check_structure(model)
        modify(model)
    with pytest.raises(UnknownNetworkError, match=f"decoder's {where} "):
        check_structure(model)
    with pytest.raises(UnknownNetworkError):  # the decode fails with it, before running anything
        transparent_vae.decode_augmented_passes(model, torch.rand(1, 3, 64, 64), torch.randn(1, 4, 8, 8))


def test_structure_check_accepts_both_official_networks():
    with torch.device("meta"):
        for latent_channels in (4, 16):
            check_structure(UNet1024(latent_channels))


def test_structure_check_accepts_layers_of_an_operations_namespace():
    """A host's layer classes (as ComfyUI's comfy.ops) subclass torch's: the network is the same."""
    class Layers:
        class Conv2d(nn.Conv2d):
            pass

        class Linear(nn.Linear):
            pass

        class GroupNorm(nn.GroupNorm):
            pass

    with torch.device("meta"):
        model = UNet1024(operations=Layers)
    assert type(model.conv_in) is Layers.Conv2d and type(model.mid_block.attentions[0].to_q) is Layers.Linear
    check_structure(model)


# --- probes ---------------------------------------------------------------------------------------

def test_nothing_is_probed_at_import():
    script = """
import torch
from lib_layerdiffuse import transparent_vae, unet1024_cpu
assert unet1024_cpu.fused_sum_dtypes.cache_info().currsize == 0
assert "_convolution_pointwise_" not in vars(torch.ops.mkldnn)
unet1024_cpu.fused_sum_dtypes()  # what a first decode does: the checks above can tell
assert unet1024_cpu.fused_sum_dtypes.cache_info().currsize == 1
assert "_convolution_pointwise_" in vars(torch.ops.mkldnn) or not torch.backends.mkldnn.is_available()
"""
    root = Path(unet1024_cpu.__file__).parent.parent
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- the pieces -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 8, 5, 7), (2, 16, 4, 4)])
def test_upsample_is_nearest_2x_then_conv(shape):
    torch.manual_seed(0)
    conv = Upsample(shape[1]).eval().conv
    x = torch.randn(*shape)
    storages = Storages()
    with torch.inference_mode():
        expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        torch.testing.assert_close(upsample(conv, x, storages), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(upsample(conv, x.contiguous(memory_format=torch.channels_last), storages), expected,
                                   atol=1e-5, rtol=0)
        assert subpixel_kernel(conv)[0] is subpixel_kernel(conv)[0]  # folded once per weight
        # refolded when the weight changes or moves to another dtype (or device)
        conv.weight = nn.Parameter(torch.randn_like(conv.weight))
        expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        torch.testing.assert_close(upsample(conv, x, storages), expected, atol=1e-4, rtol=0)  # outputs ~20 now
        conv.double()
        torch.testing.assert_close(upsample(conv, x.double(), storages), expected.double(), atol=1e-4, rtol=0)
        exact = conv(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"))
        torch.testing.assert_close(upsample(conv, x.double(), storages), exact, atol=1e-12, rtol=0)


def test_group_norm_is_precise_on_large_channels_last_maps():
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 32, eps=1e-5).eval()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    # two images just above the threshold, channels offset from zero as real activations are
    x = torch.randn(2, 32, 520, 512) * 2 + torch.linspace(-3, 3, 32).view(1, 32, 1, 1)
    assert 520 * 512 > unet1024_cpu.PRECISE_NORM_PIXELS
    storages = Storages()
    with torch.inference_mode():
        expected = F.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), 1e-5)
        channels_last = x.contiguous(memory_format=torch.channels_last)
        out = group_norm(norm, channels_last, storages)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert out.data_ptr() == storages.view("normalised", out.shape, out).data_ptr()  # into its storage
        assert (out.double() - expected).abs().max() < 1e-5  # torch's channels-last kernel: 6e-4 here
        fresh = precise_group_norm(norm, channels_last, torch.empty_like(channels_last))
        assert torch.equal(fresh, out)
        # NCHW, small maps and other dtypes are torch's own kernel
        small = x[:, :, :64, :64].contiguous(memory_format=torch.channels_last)
        assert torch.equal(group_norm(norm, small, storages), F.group_norm(small, 4, norm.weight, norm.bias, 1e-5))
        assert torch.equal(group_norm(norm, x, storages), F.group_norm(x, 4, norm.weight, norm.bias, 1e-5))
        half = channels_last.bfloat16()
        norm.bfloat16()
        assert torch.equal(group_norm(norm, half, storages), F.group_norm(half, 4, norm.weight, norm.bias, 1e-5))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.1), (torch.float64, 1e-12)])
def test_convolutions_write_into_a_view_of_a_kept_storage(dtype, tolerance):
    torch.manual_seed(0)
    x = torch.randn(1, 16, 24, 20, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(8, 16, 3, 3) * 0.1).to(dtype).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(8, dtype=dtype)
    conv = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    storage = torch.zeros(2 * 8 * 24 * 20, dtype=dtype)  # as Storages keeps them: flat, larger than needed
    view = storage[: 8 * 24 * 20].view(1, 24, 20, 8).permute(0, 3, 1, 2)
    fused = dtype in fused_sum_dtypes()  # float64 has no oneDNN path: plain convolutions
    assert fused != (dtype == torch.float64) or dtype == torch.bfloat16 or not torch.backends.mkldnn.is_available()
    with torch.inference_mode():
        view.copy_(torch.randn(1, 8, 24, 20))
        expected = view.double() + conv
        assert conv_add_(view, x, weight, bias, 1) is view  # always in place
        assert (view.double() - expected).abs().max() < tolerance
    assert not storage[view.numel():].any()  # nothing written past the view

    storages = Storages()
    with torch.inference_mode():
        first = conv_into(storages, "hidden", x, weight, bias, 1)
        assert (first.double() - conv).abs().max() < tolerance
        first.fill_(float("nan"))
        second = conv_into(storages, "hidden", x, weight, bias, 1)  # overwrites the kept storage, not adds to it
        assert (second.double() - conv).abs().max() < tolerance
        # on the CPU the result lives in the storage kept for its kind: no memory of its own
        assert (second.data_ptr() == first.data_ptr()) == fused
        assert second.is_contiguous(memory_format=torch.channels_last) or not fused
        unpadded = conv_into(storages, None, x, weight, bias, 0)  # a new tensor of the smaller size
        expected = F.conv2d(x.double(), weight.double(), bias.double())
        assert unpadded.shape == expected.shape and (unpadded.double() - expected).abs().max() < tolerance
        assert unpadded.data_ptr() != second.data_ptr()
