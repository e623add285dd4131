"""The Flux port's TransparentVAE without ComfyUI: layout, golden parity, channel order, and the
one-time .pth -> safetensors conversion (plain state dicts only)."""
from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lib_layerdiffuse import flux_vae
from lib_layerdiffuse.offset_encoder import LatentTransparencyOffsetEncoder
from lib_layerdiffuse.transparent_vae import (
    check_latent,
    decode_augmented,
    decode_augmented_passes,
    decode_transparent,
    transparency_offset,
)
from lib_layerdiffuse.errors import InputError, WeightFileError
from lib_layerdiffuse.vae_family import FLUX
from lib_layerdiffuse.weight_files import WEIGHT_FILES, build_model
from support.paths import PACK_ROOT
from support.synth import golden as load_golden
from support.synth import manifest as load_manifest
from support.synth import synthweights as load_synthweights

ATOL = 1e-4  # testkit README: float32 decoder outputs, feeds and offset_raw
ATOL_X300 = 1e-3  # testkit README: the x300 offsets and chain latents
MANIFEST = "flux_transparent_vae"
GROUPS = (flux_vae.SD_VAE, flux_vae.ENCODER_GROUP, flux_vae.DECODER_GROUP)
# The Flux VAE's latent normalisation (ComfyUI's latent_formats.Flux): the sampler works on
# (z - SHIFT_FACTOR) * SCALING_FACTOR, while LATENT["samples"] and both networks use the raw z.
SCALING_FACTOR = 0.3611
SHIFT_FACTOR = 0.1159


def group_tensors(state_dict, name):
    """The tensors of one group of the file, prefix removed."""
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def synthweights():
    return load_synthweights()


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(MANIFEST)


@pytest.fixture(scope="module")
def golden():
    return load_golden("flux_transparent_vae_seed0")[1]


def _group_float32(synthweights, manifest, group):
    """One group of the golden's weights (values depend only on seed, key and shape)."""
    sub = {"tensors": {k: v for k, v in manifest["tensors"].items() if k.startswith(group + ".")}}
    return group_tensors(synthweights.make_state_dict(sub, seed=0, dtype="float32"), group)


@pytest.fixture(scope="module")
def decoder(synthweights, manifest):
    return build_model(flux_vae.decoder, _group_float32(synthweights, manifest, flux_vae.DECODER_GROUP), "decoder")


@pytest.fixture(scope="module")
def encoder(synthweights, manifest):
    return build_model(flux_vae.encoder, _group_float32(synthweights, manifest, flux_vae.ENCODER_GROUP), "encoder")


# --- layout ---------------------------------------------------------------------------------------

def test_file_layout_is_the_manifest(manifest):
    expected = {k: tuple(v["shape"]) for k, v in manifest["tensors"].items()}
    assert flux_vae.file_layout() == expected
    sizes = {g: len(group_tensors(expected, g)) for g in GROUPS}
    assert sizes == {"sd_vae": 244, "encoder": 18, "decoder": 538}
    assert flux_vae.flux_vae_layout() == group_tensors(expected, flux_vae.SD_VAE)
    assert expected["decoder.latent_conv_in.weight"] == (64, 16, 1, 1)
    assert expected["encoder.blocks.16.weight"] == (16, 256, 3, 3)


def test_registry_has_the_two_flux_files():
    for name in (flux_vae.PTH_NAME, "layerlora.safetensors"):
        wf = WEIGHT_FILES[name]
        assert wf.family == "FLUX"
        assert wf.url == f"https://huggingface.co/RedAIGC/Flux-version-LayerDiffuse/resolve/main/{name}"


# --- golden parity --------------------------------------------------------------------------------

def test_constants_give_the_golden_raw_latent(golden):
    raw = golden["decoder.model_latent"] / SCALING_FACTOR + SHIFT_FACTOR
    torch.testing.assert_close(raw, golden["decoder.latent"], atol=1e-6, rtol=0)


def test_decoder_single_pass_matches_golden(decoder, golden):
    with torch.no_grad():
        out = decoder(golden["decoder.pixel"], golden["decoder.latent"])
    torch.testing.assert_close(out, golden["decoder.single_pass"], atol=ATOL, rtol=0)


def test_decoder_augmented_matches_golden(decoder, golden):
    passes = decode_augmented_passes(decoder, golden["decoder.pixel"], golden["decoder.latent"])
    torch.testing.assert_close(passes, golden["decoder.augmented_passes"], atol=ATOL, rtol=0)
    median = decode_augmented(decoder, golden["decoder.pixel"], golden["decoder.latent"])
    torch.testing.assert_close(median, golden["decoder.augmented"], atol=ATOL, rtol=0)
    # The full entry point (padding, sub-batches) gives the same at an aligned size.
    out = decode_transparent(FLUX, decoder, golden["decoder.pixel"], golden["decoder.latent"], sub_batch_size=2)
    torch.testing.assert_close(out, golden["decoder.augmented"], atol=ATOL, rtol=0)


def test_encoder_matches_golden_and_scales_by_300(encoder, golden):
    with torch.no_grad():
        raw = encoder(golden["encoder.feed"])
    torch.testing.assert_close(raw, golden["encoder.offset_raw"], atol=ATOL, rtol=0)
    torch.testing.assert_close(raw * FLUX.offset_scale, golden["encoder.offset"], atol=ATOL_X300, rtol=0)


def test_encoder_pipeline_is_rgb_then_alpha(encoder, golden):
    image = golden["encoder_pipeline.rgba_uint8"].float().div(255).movedim(-1, 1)
    rgb, alpha = image[:, :3], image[:, 3:]
    feed = FLUX.feed(rgb, alpha)
    torch.testing.assert_close(feed, golden["encoder_pipeline.feed"], atol=ATOL, rtol=0)
    assert torch.equal(feed[:, 3:], alpha)  # alpha last, unlike the SD feed
    offset = transparency_offset(FLUX, encoder, rgb, alpha)
    torch.testing.assert_close(offset, golden["encoder_pipeline.offset"], atol=ATOL_X300, rtol=0)
    # The SD order (alpha first) would give another offset: the order is not a detail.
    with torch.no_grad():
        wrong = encoder(feed[:, [3, 0, 1, 2]]) * FLUX.offset_scale
    assert (wrong - golden["encoder_pipeline.offset"]).abs().max() > 100 * ATOL_X300


@pytest.mark.parametrize("height,width", [(80, 48), (16, 16)])
def test_any_multiple_of_8_keeps_its_size(decoder, height, width):
    generator = torch.Generator().manual_seed(3)
    pixel = torch.rand(1, 3, height, width, generator=generator)
    latent = torch.randn(1, 16, height // 8, width // 8, generator=generator)
    out = decode_transparent(FLUX, decoder, pixel, latent, sub_batch_size=1)
    assert out.shape == (1, 4, height, width) and out.min() >= 0 and out.max() <= 1


def test_sd_sized_latents_are_refused():
    with pytest.raises(InputError, match="Node X: the latent has 4 channels but the Flux transparent decoder takes 16: "
                                         ".*SD1.5/SDXL latents have 4 channels and go to Layer Diffuse Decode"):
        check_latent(FLUX, torch.randn(1, 4, 8, 8), "Node X")


def test_encoder_needs_multiples_of_8(encoder):
    with pytest.raises(InputError, match="multiples of 8"):
        transparency_offset(FLUX, encoder, torch.rand(1, 3, 64, 60), torch.ones(1, 1, 64, 60))


# --- .pth -> safetensors --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_pth(tmp_path_factory, synthweights, manifest):
    """A pickle of the port's structure: torch.save of an OrderedDict of bfloat16 tensors."""
    path = tmp_path_factory.mktemp("flux_pth") / flux_vae.PTH_NAME
    torch.save(collections.OrderedDict(synthweights.make_state_dict(manifest, seed=0)), str(path))
    return path


def test_conversion_keeps_every_tensor(synthetic_pth, tmp_path, manifest):
    target = tmp_path / flux_vae.SAFETENSORS_NAME
    assert flux_vae.convert_pth(str(synthetic_pth), str(target)) == str(target)
    # Byte for byte the size the manifest gives for the converted file.
    assert target.stat().st_size == manifest["expected_file_bytes"]
    converted = load_file(str(target))
    original = torch.load(str(synthetic_pth), weights_only=True)
    assert set(converted) == set(original)
    for key, tensor in original.items():
        assert converted[key].dtype == torch.bfloat16 and torch.equal(converted[key], tensor), key
    assert sorted(p.name for p in tmp_path.iterdir()) == [flux_vae.SAFETENSORS_NAME]
    # The converted groups load strictly into the networks.
    build_model(flux_vae.decoder, group_tensors(converted, flux_vae.DECODER_GROUP), target.name)
    build_model(flux_vae.encoder, group_tensors(converted, flux_vae.ENCODER_GROUP), target.name)


def test_command_line_conversion(synthetic_pth, tmp_path):
    target = tmp_path / "out.safetensors"
    done = subprocess.run([sys.executable, "-m", "lib_layerdiffuse.flux_vae", str(synthetic_pth), str(target)],
                          cwd=str(PACK_ROOT), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {target}" in done.stdout and target.is_file()
    bad = subprocess.run([sys.executable, "-m", "lib_layerdiffuse.flux_vae", str(tmp_path / "missing.pth")],
                         cwd=str(PACK_ROOT), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "no such file" in bad.stderr


def test_truncated_pth_is_refused(synthetic_pth, tmp_path):
    truncated = tmp_path / flux_vae.PTH_NAME
    with open(synthetic_pth, "rb") as source, open(truncated, "wb") as out:
        out.write(source.read(synthetic_pth.stat().st_size // 2))
    target = tmp_path / flux_vae.SAFETENSORS_NAME
    with pytest.raises(WeightFileError, match="corrupt or incomplete.*download it again"):
        flux_vae.convert_pth(str(truncated), str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == [flux_vae.PTH_NAME]


class _Payload:
    """Unpickling this would create a file: what a malicious pickle would do instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_module_and_code_are_refused(tmp_path):
    module_pth = tmp_path / "module.pth"
    torch.save(flux_vae.encoder(), str(module_pth))
    with pytest.raises(WeightFileError, match="not a plain state dict.*LatentTransparencyOffsetEncoder"):
        flux_vae.convert_pth(str(module_pth), str(tmp_path / "out.safetensors"))

    marker = tmp_path / "ran"
    code_pth = tmp_path / "code.pth"
    torch.save({"decoder.conv_in.weight": torch.zeros(1), "x": _Payload(str(marker))}, str(code_pth))
    with pytest.raises(WeightFileError, match="not a plain state dict"):
        flux_vae.convert_pth(str(code_pth), str(tmp_path / "out.safetensors"))
    assert not marker.exists()

    list_pth = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], str(list_pth))
    with pytest.raises(WeightFileError, match="holds a list, not a state dict"):
        flux_vae.read_pth(str(list_pth))
    assert not (tmp_path / "out.safetensors").exists()


def test_wrong_layout_lists_the_differences(tmp_path):
    sd_encoder = {f"encoder.{k}": v for k, v in LatentTransparencyOffsetEncoder(4).state_dict().items()}
    path = tmp_path / "sd_encoder.pth"
    torch.save(collections.OrderedDict(sd_encoder), str(path))
    with pytest.raises(WeightFileError) as error:
        flux_vae.convert_pth(str(path), str(tmp_path / "out.safetensors"))
    text = str(error.value)
    assert "missing 782 keys: decoder.conv_in.bias" in text
    assert "encoder.blocks.16.weight [4, 256, 3, 3] (expected [16, 256, 3, 3])" in text
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(WeightFileError, match="no such file"):
        flux_vae.read_pth(str(tmp_path / "absent.pth"))
    assert os.listdir(tmp_path) == ["sd_encoder.pth"]
