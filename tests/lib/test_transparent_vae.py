"""The transparent VAE library without ComfyUI: layouts, golden parity, sizes, batches, errors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lib_layerdiffuse.offset_encoder import LatentTransparencyOffsetEncoder
from lib_layerdiffuse.transparent_vae import (
    check_latent,
    check_pixels,
    decode_augmented,
    decode_augmented_passes,
    decode_transparent,
    latent_with_offset,
    posterior_mean_std,
    transparency_offset,
)
from lib_layerdiffuse.unet1024 import UNet1024
from lib_layerdiffuse.errors import InputError, WeightFileError
from lib_layerdiffuse.finite import NonFiniteError
from lib_layerdiffuse.vae_family import SD
from lib_layerdiffuse.weight_files import WEIGHT_FILES, build_model, read_safetensors
from support.synth import golden as load_golden
from support.synth import manifest, state_dict, synthetic_file

ATOL = 1e-4  # the testkit README's tolerance for float32 implementations
DECODER_MANIFESTS = ["vae_transparent_decoder", "layer_sd15_vae_transparent_decoder"]
ENCODER_MANIFESTS = ["vae_transparent_encoder", "layer_sd15_vae_transparent_encoder"]


@pytest.fixture(scope="module")
def golden():
    return load_golden("transparent_vae_seed0")[1]


@pytest.fixture(scope="module")
def float32_state_dicts():
    return lambda stem: state_dict(stem, seed=0, dtype="float32")


@pytest.fixture(scope="module")
def decoder(float32_state_dicts):
    return build_model(UNet1024, float32_state_dicts("vae_transparent_decoder"), "vae_transparent_decoder.safetensors")


@pytest.fixture(scope="module")
def encoder(float32_state_dicts):
    return build_model(LatentTransparencyOffsetEncoder, float32_state_dicts("vae_transparent_encoder"),
                       "vae_transparent_encoder.safetensors")


@pytest.mark.parametrize("stem,factory", [(s, UNet1024) for s in DECODER_MANIFESTS]
                         + [(s, LatentTransparencyOffsetEncoder) for s in ENCODER_MANIFESTS])
def test_official_layouts_load_strictly(stem, factory):
    layout = manifest(stem)
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in factory().state_dict().items()}
    assert ours == {k: v["shape"] for k, v in layout["tensors"].items()}

    path = synthetic_file(stem)
    assert path.stat().st_size == layout["expected_file_bytes"]
    assert path.name in WEIGHT_FILES
    model = build_model(factory, read_safetensors(str(path)), path.name)
    assert next(model.parameters()).dtype == torch.float32 and not next(model.parameters()).requires_grad


def test_decoder_single_pass_matches_golden(decoder, golden):
    with torch.no_grad():
        out = decoder(golden["decoder.pixel"], golden["decoder.latent"])
    torch.testing.assert_close(out, golden["decoder.single_pass"], atol=ATOL, rtol=0)


def test_decoder_augmented_matches_golden(decoder, golden):
    calls = []
    passes = decode_augmented_passes(decoder, golden["decoder.pixel"], golden["decoder.latent"], lambda: calls.append(1))
    torch.testing.assert_close(passes, golden["decoder.augmented_passes"], atol=ATOL, rtol=0)
    assert len(calls) == 8
    median = decode_augmented(decoder, golden["decoder.pixel"], golden["decoder.latent"])
    torch.testing.assert_close(median, golden["decoder.augmented"], atol=ATOL, rtol=0)
    # The lower middle value, not the mean of the two middle values.
    mean_of_middle = passes.sort(dim=0).values[3:5].mean(dim=0)
    assert (mean_of_middle - golden["decoder.augmented"]).abs().max() > 10 * ATOL


def test_fewer_passes(decoder, golden):
    pixel, latent = golden["decoder.pixel"], golden["decoder.latent"]
    calls = []
    four = decode_transparent(SD, decoder, pixel, latent, 1, on_pass=lambda: calls.append(1), passes=4)
    assert len(calls) == 4
    passes = golden["decoder.augmented_passes"][[0, 2, 4, 6]]
    torch.testing.assert_close(four, SD.to_rgba(passes.median(dim=0).values), atol=ATOL, rtol=0)
    one = decode_transparent(SD, decoder, pixel, latent, 1, passes=1)
    torch.testing.assert_close(one, SD.to_rgba(golden["decoder.single_pass"].clamp(0, 1)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_half_precision_network(float32_state_dicts, golden, dtype, tolerance):
    """The body in half precision, the input convolutions in float32 (the image and the latent
    are not rounded), the output float32."""
    half_decoder = build_model(UNet1024, float32_state_dicts("vae_transparent_decoder"), "decoder", dtype=dtype)
    assert half_decoder.compute_dtype == dtype and half_decoder.down_blocks[0].resnets[0].conv1.weight.dtype == dtype
    assert half_decoder.conv_in.weight.dtype == half_decoder.latent_conv_in.weight.dtype == torch.float32
    half = decode_transparent(SD, half_decoder, golden["decoder.pixel"], golden["decoder.latent"], 1)
    assert half.dtype == torch.float32
    assert 0 < (half - SD.to_rgba(golden["decoder.augmented"])).abs().max() < tolerance


def test_decode_transparent_of_aligned_size_is_the_augmented_decode(decoder, golden):
    out = decode_transparent(SD, decoder, golden["decoder.pixel"], golden["decoder.latent"], sub_batch_size=4)
    torch.testing.assert_close(out, SD.to_rgba(golden["decoder.augmented"]), atol=ATOL, rtol=0)
    # R,G,B,A: the SD decoder predicts alpha first.
    assert torch.equal(out[:, 3], decode_augmented(decoder, golden["decoder.pixel"], golden["decoder.latent"])[:, 0])


def test_encoder_matches_golden(encoder, golden):
    with torch.no_grad():
        torch.testing.assert_close(encoder(golden["encoder.feed"]), golden["encoder.offset"], atol=ATOL, rtol=0)


def test_pad_rgb_and_encoder_pipeline_match_golden(encoder, golden):
    image = golden["encoder_pipeline.rgba_uint8"].float().div(255).movedim(-1, 1)
    rgb, alpha = image[:, :3], image[:, 3:]
    feed = SD.feed(rgb, alpha)
    torch.testing.assert_close(feed, golden["encoder_pipeline.feed"], atol=ATOL, rtol=0)
    assert torch.equal(feed[:, :1], alpha)  # alpha first
    offset = transparency_offset(SD, encoder, rgb, alpha)
    torch.testing.assert_close(offset, golden["encoder_pipeline.offset"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("height,width", [(120, 200), (8, 8), (64, 72)])
def test_any_multiple_of_8_keeps_its_size(decoder, height, width):
    generator = torch.Generator().manual_seed(1)
    pixel = torch.rand(1, 3, height, width, generator=generator)
    latent = torch.randn(1, 4, height // 8, width // 8, generator=generator)
    out = decode_transparent(SD, decoder, pixel, latent, sub_batch_size=1)
    assert out.shape == (1, 4, height, width)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_sub_batches_give_the_same_result(decoder):
    generator = torch.Generator().manual_seed(2)
    pixel = torch.rand(3, 3, 64, 64, generator=generator)
    latent = torch.randn(3, 4, 8, 8, generator=generator)
    calls = []
    whole = decode_transparent(SD, decoder, pixel, latent, sub_batch_size=3, on_pass=lambda: calls.append(1))
    assert len(calls) == 8
    split = decode_transparent(SD, decoder, pixel, latent, sub_batch_size=2, on_pass=lambda: calls.append(1))
    assert len(calls) == 8 + 16
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=0)
    # Each image is decoded on its own: the second image alone gives its row of the batch.
    torch.testing.assert_close(decode_transparent(SD, decoder, pixel[1:2], latent[1:2], 1), whole[1:2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pixel_shape,latent_shape,message", [
    ((2, 3, 64, 64), (1, 4, 8, 8), "Node X: batch mismatch: 2 images but 1 latents"),
    ((1, 3, 64, 64), (1, 4, 8, 16), "Node X: size mismatch"),
    ((1, 3, 64, 64), (1, 16, 8, 8), "Node X: the latent has 16 channels but the SD1.5/SDXL transparent decoder "
                                    "takes 4: .*Flux latents have 16 and go to Layer Diffuse Flux Decode"),
    ((1, 4, 64, 64), (1, 4, 8, 8), "Node X: images has 4 channels.*not an RGBA image"),
    ((1, 1, 64, 64), (1, 4, 8, 8), "Node X: images has 1 channels"),
    ((0, 3, 64, 64), (0, 4, 8, 8), "Node X: samples is an empty batch"),
    ((1, 3, 64, 64), (4, 8, 8), r"Node X: samples has shape \[4, 8, 8\]"),
])
def test_mismatched_inputs_are_clear_errors(pixel_shape, latent_shape, message):
    latent = torch.randn(latent_shape)
    with pytest.raises(InputError, match=message):
        check_latent(SD, latent, "Node X")
        check_pixels(torch.rand(pixel_shape), latent, "Node X")


@pytest.mark.parametrize("what,value", [("samples", float("nan")), ("images", float("inf"))])
def test_non_finite_inputs_are_counted_and_named(what, value):
    pixel, latent = torch.rand(2, 3, 64, 64), torch.randn(2, 4, 8, 8)
    target = latent if what == "samples" else pixel
    target[1, 0, :2, :3] = value
    with pytest.raises(NonFiniteError) as error:
        check_latent(SD, latent, "Node X")
        check_pixels(pixel, latent, "Node X")
    text = str(error.value)
    assert text.startswith(f"Node X: {what}")
    count = "6 NaN and 0 infinite" if what == "samples" else "0 NaN and 6 infinite"
    assert f"holds {count} values (of {target.numel()})" in text
    assert ("--fp32-vae" in text) == (what == "images") and ("CFG" in text) == (what == "samples")


def test_a_decoder_that_overflows_is_an_error_not_a_black_image(float32_state_dicts, golden):
    """float16 overflow in the network (here: a weight too large for float16) gives inf/NaN,
    which the clamp would turn into 0 and 1 silently."""
    state = dict(float32_state_dicts("vae_transparent_decoder"))
    state["conv_out.weight"] = state["conv_out.weight"] * 1e5
    overflowing = build_model(UNet1024, state, "decoder", dtype=torch.float16)
    with pytest.raises(NonFiniteError, match="the transparent decoder: its output holds .*set precision to "
                                             "bfloat16 or float32"):
        decode_transparent(SD, overflowing, golden["decoder.pixel"], golden["decoder.latent"], 1)


def test_encoder_rejects_sizes_that_are_not_multiples_of_8(encoder):
    with pytest.raises(InputError, match="multiples of 8"):
        transparency_offset(SD, encoder, torch.rand(1, 3, 60, 64), torch.ones(1, 1, 60, 64))


def test_latent_with_offset_moves_the_mean_by_std_units():
    moments = torch.cat([torch.full((1, 4, 2, 2), 0.5), torch.full((1, 4, 2, 2), 2 * torch.log(torch.tensor(0.1)).item())], 1)
    mean, std = posterior_mean_std(moments)
    torch.testing.assert_close(std, torch.full((1, 4, 2, 2), 0.1))
    torch.testing.assert_close(latent_with_offset(mean, std, torch.ones(1, 4, 2, 2)), torch.full((1, 4, 2, 2), 0.6))
    _, huge = posterior_mean_std(torch.cat([mean, torch.full_like(mean, 100.0)], 1))
    torch.testing.assert_close(huge, torch.full_like(mean, torch.exp(torch.tensor(10.0)).item()))


# --- weight file errors ---------------------------------------------------------------------------

def test_missing_file_is_named(tmp_path):
    with pytest.raises(WeightFileError, match="vae_transparent_decoder.safetensors: no such file"):
        read_safetensors(str(tmp_path / "vae_transparent_decoder.safetensors"))


def test_pickles_are_refused(tmp_path):
    path = tmp_path / "vae_transparent_decoder.pth"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(WeightFileError, match="only .safetensors"):
        read_safetensors(str(path))


def test_truncated_file_says_to_download_again(tmp_path):
    source = synthetic_file("vae_transparent_encoder")
    truncated = tmp_path / source.name
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(WeightFileError, match="corrupt or incomplete.*download it again"):
        read_safetensors(str(truncated))


def test_wrong_layout_lists_missing_and_unexpected_keys(tmp_path):
    encoder_file = read_safetensors(str(synthetic_file("vae_transparent_encoder")))
    with pytest.raises(WeightFileError) as error:
        build_model(UNet1024, encoder_file, "vae_transparent_decoder.safetensors")
    text = str(error.value)
    assert "vae_transparent_decoder.safetensors" in text
    assert "missing 538 keys" in text and "conv_in.weight" in text
    assert "unexpected 18 keys" in text and "blocks.0.weight" in text


def test_wrong_shape_is_reported(float32_state_dicts):
    state = dict(float32_state_dicts("vae_transparent_encoder"))
    state["blocks.16.weight"] = torch.zeros(16, 256, 3, 3)
    with pytest.raises(WeightFileError, match=r"blocks.16.weight \[16, 256, 3, 3\] \(expected \[4, 256, 3, 3\]\)"):
        build_model(LatentTransparencyOffsetEncoder, state, "vae_transparent_encoder.safetensors")


def test_flux_sized_networks_have_16_latent_channels():
    with torch.device("meta"):
        assert UNet1024(latent_channels=16).latent_conv_in.weight.shape == (64, 16, 1, 1)
        assert LatentTransparencyOffsetEncoder(latent_channels=16).blocks[-1].weight.shape == (16, 256, 3, 3)


def test_saved_and_reloaded_network_is_identical(tmp_path, decoder):
    path = tmp_path / "vae_transparent_decoder.safetensors"
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(path))
    again = build_model(UNet1024, read_safetensors(str(path)), path.name)
    assert all(torch.equal(a, b) for a, b in zip(decoder.state_dict().values(), again.state_dict().values()))
