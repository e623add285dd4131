"""The Flux nodes inside a real ComfyUI process (CPU): the chain goldens through ComfyUI's own VAE,
the LoRA's key mapping through comfy.lora, the .pth conversion on first use."""
from __future__ import annotations

import collections
import logging

import pytest
import torch
from safetensors.torch import load_file

from support.images import rgba_disc
from support.pack import pack_module, run_node
from support.synth import golden, manifest, synthetic_file, synthweights

ATOL = 1e-4
ATOL_X300 = 1e-3
FLUX_NODES = ["LayeredDiffusionFluxApply", "LayeredDiffusionFluxVAELoader", "LayeredDiffusionFluxDecode",
              "LayeredDiffusionFluxEncode"]
# What comfy.model_detection makes of a FLUX.1-dev checkpoint (also the layerlora manifest's config).
FLUX_DEV_CONFIG = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
                   "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
                   "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
                   "guidance_embed": True, "txt_ids_dims": []}


@pytest.fixture(scope="module")
def flux_golden():
    return golden("flux_transparent_vae_seed0")[1]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """A layer_model folder with a float32 synthetic TransparentVAE.safetensors (the goldens' weights)."""
    folder = tmp_path_factory.mktemp("flux_layer_model")
    source = synthetic_file("flux_transparent_vae", dtype="float32")
    (folder / source.name).symlink_to(source)
    return folder


@pytest.fixture()
def flux_layer_model(pack, flux_folder, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model", ([str(flux_folder)], {".safetensors"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return flux_folder


@pytest.fixture()
def flux_vae(pack, flux_layer_model):
    (vae,) = run_node(pack, "LayeredDiffusionFluxVAELoader")
    return vae


# --- registration ---------------------------------------------------------------------------------

@pytest.mark.registration
def test_flux_nodes_register_through_comfyui_loader(pack):
    for node_id in FLUX_NODES:
        schema = pack.NODE_CLASS_MAPPINGS[node_id].define_schema()
        assert schema.category == "layer_diffuse/flux"
        assert all(i.tooltip for i in schema.inputs), f"{node_id} has inputs without tooltips"


# --- the chain goldens through ComfyUI's VAE --------------------------------------------------------

def test_vae_from_the_file_is_a_flux_vae(flux_vae, flux_golden):
    assert flux_vae.latent_channels == 16 and flux_vae.vae_dtype == torch.float32
    assert type(flux_vae.first_stage_model.regularization).__name__ == "DiagonalGaussianRegularizer"
    pixel = pack_module("nodes.vae_pipeline").decode_unclamped(flux_vae, flux_golden["decoder.latent"])
    torch.testing.assert_close(pixel, flux_golden["chain.origin_pixel"], atol=ATOL, rtol=0)
    # The decoder needs these unclamped values: ComfyUI's VAE.decode would clamp them.
    assert pixel.min() < -0.5 and pixel.max() > 1.2
    torch.testing.assert_close(flux_vae.decode(flux_golden["decoder.latent"]), pixel.clamp(0, 1).movedim(1, -1),
                               atol=ATOL, rtol=0)


def test_decode_node_matches_the_chain_golden(pack, flux_vae, flux_golden):
    image, mask = run_node(pack, "LayeredDiffusionFluxDecode", samples={"samples": flux_golden["decoder.latent"]},
                           vae=flux_vae, sub_batch_size=4)
    assert image.shape == (1, 64, 64, 4) and image.dtype == torch.float32
    torch.testing.assert_close(image, flux_golden["chain.decoded"].movedim(1, -1), atol=ATOL, rtol=0)
    assert torch.equal(mask, image[..., 3])

    import comfy.model_management

    loaded = [m.model for m in comfy.model_management.current_loaded_models]
    assert any(type(getattr(m, "model", None)).__name__ == "UNet1024" for m in loaded), "not managed by ComfyUI"


def test_encode_node_matches_the_chain_golden(pack, flux_vae, flux_golden):
    image = flux_golden["encoder_pipeline.rgba_uint8"].float() / 255
    rgb, alpha = image[..., :3].movedim(-1, 1), image[..., 3:].movedim(-1, 1)
    mean, std = pack_module("nodes.vae_pipeline").vae_posterior(flux_vae, 0.5 + (rgb - 0.5) * alpha)
    torch.testing.assert_close(mean, flux_golden["chain.posterior_mean"], atol=ATOL_X300, rtol=0)
    torch.testing.assert_close(std, flux_golden["chain.posterior_std"], atol=ATOL_X300, rtol=0)

    (latent,) = run_node(pack, "LayeredDiffusionFluxEncode", vae=flux_vae, image=image)
    torch.testing.assert_close(latent["samples"], flux_golden["chain.latent_raw"], atol=ATOL_X300, rtol=0)
    # The same image as RGB plus LoadImage's mask (1 = transparent) is the same latent.
    (again,) = run_node(pack, "LayeredDiffusionFluxEncode", vae=flux_vae, image=image[..., :3], mask=1 - image[..., 3])
    torch.testing.assert_close(again["samples"], latent["samples"], atol=ATOL, rtol=1e-5)  # 1 - (1 - a) rounding
    # What the sampler sees is ComfyUI's Flux latent format applied to it: the port's model-space latent.
    import comfy.latent_formats

    model_space = comfy.latent_formats.Flux().process_in(latent["samples"])
    torch.testing.assert_close(model_space, flux_golden["chain.latent"], atol=ATOL_X300, rtol=0)


def test_any_size_round_trips_and_bad_inputs_say_what_to_connect(pack, flux_vae):
    image = rgba_disc(72, 104)
    (latent,) = run_node(pack, "LayeredDiffusionFluxEncode", vae=flux_vae, image=image)
    assert latent["samples"].shape == (1, 16, 9, 13)
    rgba, mask = run_node(pack, "LayeredDiffusionFluxDecode", samples=latent, vae=flux_vae, sub_batch_size=1)
    assert rgba.shape == (1, 72, 104, 4) and mask.shape == (1, 72, 104)
    assert rgba.min() >= 0 and rgba.max() <= 1

    with pytest.raises(pack_module("lib_layerdiffuse.errors").InputError,
                       match="Layer Diffuse Flux Decode: the latent has 4 channels but the Flux transparent decoder "
                             "takes 16: .*SD1.5/SDXL latents have 4 channels and go to Layer Diffuse Decode"):
        run_node(pack, "LayeredDiffusionFluxDecode", samples={"samples": torch.zeros(1, 4, 8, 8)}, vae=flux_vae,
                 sub_batch_size=1)

    class SDVae:  # the only property the check reads; a real SD VAE needs a 2 GB synthetic checkpoint
        latent_channels = 4

    with pytest.raises(pack_module("lib_layerdiffuse.errors").ModelError, match="4-channel latents; connect the Flux VAE"):
        run_node(pack, "LayeredDiffusionFluxEncode", vae=SDVae(), image=image)


def test_decode_passes_and_progress(pack, flux_vae, flux_golden, monkeypatch):
    import comfy.utils

    updates = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: updates.append((value, total)))
    latent = flux_golden["decoder.latent"].repeat(3, 1, 1, 1)
    image, _ = run_node(pack, "LayeredDiffusionFluxDecode", samples={"samples": latent}, vae=flux_vae,
                        sub_batch_size=2, passes="1", precision="float32")
    assert updates == [(1, 2), (2, 2)]
    # One pass is the clipped single pass of the decoder on the unclamped pixels.
    decoder = pack_module("nodes.flux_weights").transparent_vae_network(
        "decoder", pack_module("lib_layerdiffuse.flux_vae").decoder, torch.float32).model
    with torch.no_grad():
        single = decoder(flux_golden["chain.origin_pixel"], flux_golden["decoder.latent"]).clamp(0, 1)
    for row in image:
        torch.testing.assert_close(row, single[0].movedim(0, -1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("node_id,inputs,message", [
    ("LayeredDiffusionFluxDecode", {"samples": {"samples": torch.full((1, 16, 8, 8), float("nan"))}},
     r"Layer Diffuse Flux Decode: samples holds 1024 NaN and 0 infinite values \(of 1024\); the sampler diverged"),
    ("LayeredDiffusionFluxDecode", {"samples": {"samples": torch.zeros(0, 16, 8, 8)}},
     "Layer Diffuse Flux Decode: samples is an empty batch"),
    ("LayeredDiffusionFluxDecode", {"samples": {"samples": torch.randn(1, 4, 8, 8)}},
     "Layer Diffuse Flux Decode: the latent has 4 channels but the Flux transparent decoder takes 16.*Layer Diffuse "
     "Decode"),
    ("LayeredDiffusionFluxEncode", {"image": torch.full((1, 64, 64, 4), float("inf"))},
     r"Layer Diffuse Flux Encode: image holds 0 NaN and 16384 infinite values"),
    ("LayeredDiffusionFluxEncode", {"image": torch.rand(1, 7, 7, 4)},
     r"Layer Diffuse Flux Encode: the image is 7x7; it must be at least 8x8"),
])
def test_bad_inputs_are_errors_that_name_the_node(pack, flux_vae, node_id, inputs, message):
    errors = pack_module("lib_layerdiffuse.errors")
    extra = {"sub_batch_size": 1} if node_id.endswith("Decode") else {}
    with pytest.raises(errors.LayerDiffuseError, match=message):
        run_node(pack, node_id, vae=flux_vae, **inputs, **extra)


def test_a_vae_that_overflows_is_an_error(pack, flux_vae, monkeypatch):
    """A Flux VAE whose decode overflows (as one in float16 can) is named with the cure."""
    first_stage = flux_vae.first_stage_model
    monkeypatch.setattr(first_stage, "decode", lambda z: torch.full((z.shape[0], 3, 64, 64), float("nan")))
    with pytest.raises(pack_module("lib_layerdiffuse.finite").NonFiniteError,
                       match=r"Layer Diffuse Flux Decode: images \(the VAE-decoded latent\) holds 12288 NaN.*--fp32-vae"):
        run_node(pack, "LayeredDiffusionFluxDecode", samples={"samples": torch.randn(1, 16, 8, 8)}, vae=flux_vae,
                 sub_batch_size=1)


# --- weight files ---------------------------------------------------------------------------------

def test_pth_is_converted_on_first_use_and_missing_files_name_the_url(pack, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model", ([str(tmp_path)], {".safetensors"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weight_files = pack_module("lib_layerdiffuse.weight_files")
    with pytest.raises(weight_files.WeightFileError) as error:
        run_node(pack, "LayeredDiffusionFluxVAELoader")
    text = str(error.value)
    assert "https://huggingface.co/RedAIGC/Flux-version-LayerDiffuse/resolve/main/TransparentVAE.pth" in text
    assert str(tmp_path) in text

    layout = manifest("flux_transparent_vae")
    torch.save(collections.OrderedDict(synthweights().make_state_dict(layout, seed=0)), str(tmp_path / "TransparentVAE.pth"))
    (vae,) = run_node(pack, "LayeredDiffusionFluxVAELoader")
    assert vae.latent_channels == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TransparentVAE.pth", "TransparentVAE.safetensors"]
    assert (tmp_path / "TransparentVAE.safetensors").stat().st_size == layout["expected_file_bytes"]
    (rgba, _) = run_node(pack, "LayeredDiffusionFluxDecode", samples={"samples": torch.randn(1, 16, 8, 8)}, vae=vae,
                         sub_batch_size=1)
    assert rgba.shape == (1, 64, 64, 4)


# --- the LoRA on FLUX.1-dev (built on the meta device) ------------------------------------------------

@pytest.fixture(scope="module")
def flux_dev_on_meta(pack):
    """A FLUX.1-dev model as ComfyUI builds it, on the meta device: the real one (12 B parameters,
    24 GB in bf16) does not fit this machine, and key mapping needs only names and shapes."""
    import comfy.model_detection
    import comfy.model_patcher

    model_config = comfy.model_detection.model_config_from_unet_config(dict(FLUX_DEV_CONFIG))
    assert type(model_config).__name__ == "Flux"
    model_config.set_inference_dtype(torch.bfloat16, None)
    with torch.device("meta"):
        model = model_config.get_model({}, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def layerlora():
    return synthetic_file("flux_layerlora")


def test_comfyui_maps_every_layerlora_key_onto_flux_dev(flux_dev_on_meta, layerlora, caplog):
    import comfy.lora

    lora = load_file(str(layerlora))
    assert len(lora) == 912
    key_map = comfy.lora.model_lora_keys_unet(flux_dev_on_meta.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()], "lora key not loaded"
    assert len(patches) == 304
    weights = flux_dev_on_meta.model.state_dict()
    for target, adapter in patches.items():
        up, down = adapter.weights[:2]
        assert tuple(weights[target].shape) == (up.shape[0], down.shape[1]), target


def test_apply_node_patches_the_model_through_comfyui(pack, flux_dev_on_meta, layerlora, tmp_path, monkeypatch):
    import folder_paths

    (tmp_path / layerlora.name).symlink_to(layerlora)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model", ([str(tmp_path)], {".safetensors"}))
    (patched,) = run_node(pack, "LayeredDiffusionFluxApply", model=flux_dev_on_meta, strength=0.8)
    assert patched is not flux_dev_on_meta and not flux_dev_on_meta.patches
    assert len(patched.patches) == 304
    assert {entry[0] for patches in patched.patches.values() for entry in patches} == {0.8}
