"""The SDXL modes' host glue (nodes/sdxl_patches.py) in the real ComfyUI (CPU): weight patches
through ComfyUI's LoRA loading, concat conditioning, stop_at as a keyframed weight hook (run on the
SD1.5 UNet with synthetic patch files, where an SDXL UNet would not fit), and every official SDXL
file mapped onto the real SDXL UNet (built on the meta device)."""
from __future__ import annotations

import pytest
import torch

from support.layer_files import layer_model_files
from support.pack import pack_module
from support.sd_models import SD15_GOLDENS, percent_between, sample_evals, sample_once, sdxl_model
from support.synth import golden, manifest, meta_state, synthweights

TRANSPARENT = "sd15_transparent_attn_seed0"
SDXL_PATCH_MANIFESTS = ["layer_xl_transparent_attn", "layer_xl_transparent_conv", "layer_xl_fg2ble",
                        "layer_xl_bg2ble", "layer_xl_fgble2bg", "layer_xl_bgble2fg"]


@pytest.fixture(scope="module")
def sdxl(pack):
    return pack_module("nodes.sdxl_patches")


@pytest.fixture(scope="module")
def goldens():
    return {stem: golden(stem)[1] for stem in SD15_GOLDENS}


def _synthetic_concat_file(path, extra_channels=4):
    """A small layer-conditioning patch file for the SD1.5 UNet: a widened input conv (diff), its
    bias, a ResBlock conv (diff) and an attention LoRA, exercising every kind of patch."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    q = "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
    state = {
        "diffusion_model.input_blocks.0.0.weight::diff::0": torch.randn(320, 4 + extra_channels, 3, 3, generator=gen) * 0.05,
        "diffusion_model.input_blocks.0.0.bias::diff::0": torch.randn(320, generator=gen) * 0.01,
        "diffusion_model.input_blocks.1.0.in_layers.2.weight::diff::0": torch.randn(320, 320, 3, 3, generator=gen) * 0.005,
        f"{q}::lora::0": torch.randn(1280, 8, generator=gen) * 0.05,
        f"{q}::lora::1": torch.randn(8, 1280, generator=gen) * 0.05,
    }
    save_file({k: v.half() for k, v in state.items()}, str(path))
    return path


def test_concat_mode_stop_at_drops_weights_and_concat(sdxl, sd15_model, goldens, tmp_path):
    """The SDXL layer-conditioning machinery (weight patches + concat conditioning + stop_at),
    run on the SD1.5 UNet with a synthetic patch file, since an SDXL UNet does not fit in memory."""
    g = goldens[TRANSPARENT]
    # named like an official file, which is where the mode's code looks for it
    path = _synthetic_concat_file(tmp_path / "layer_xl_fg2ble.safetensors")
    mode = pack_module("nodes.modes").Mode("SD15 concat test", path.name, "SD15")
    cond, uncond = [[g["input.cond_context"], {}]], [[g["input.uncond_context"], {}]]
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))}
    high, low = float(g["input.sigma"][0]), 0.5
    stop = percent_between(sd15_model, high, low)

    with layer_model_files(path):
        full = sdxl.apply_concat_mode(sd15_model, mode, cond, uncond, [latent], 1.0)
        stopping = sdxl.apply_concat_mode(sd15_model, mode, cond, uncond, [latent], 1.0, stop_at=stop)
        model0, cond0, uncond0 = sdxl.apply_concat_mode(sd15_model, mode, cond, uncond, [latent], 1.0, stop_at=0.0)
    full_first, full_second = sample_evals(full[0], g, [high, low], full[1], full[2])
    first, second = sample_evals(stopping[0], g, [high, low], stopping[1], stopping[2])
    base_first, base_second = sample_evals(sd15_model, g, [high, low])
    assert (first - full_first).abs().max() < 1e-4  # before stop_at: hooked weights = patched weights
    assert torch.equal(second, base_second)  # after it: the original weights, no concat
    assert (full_second - base_second).abs().max() > 0.1 and (first - base_first).abs().max() > 0.1
    # stop_at 0 leaves nothing of the mode
    assert torch.equal(sample_once(model0, g, cond=cond0, uncond=uncond0), sample_once(sd15_model, g))
    # and the checkpoint's model is untouched afterwards
    assert torch.equal(sample_evals(sd15_model, g, [high, low])[1], base_second)


def _synthetic_lora_patches(tmp_path):
    """Same-shape patches for the SD1.5 UNet (an attention LoRA and a conv diff), like the SDXL
    foreground files hold."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(4)
    q = "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
    state = {
        f"{q}::lora::0": torch.randn(1280, 8, generator=gen) * 0.05,
        f"{q}::lora::1": torch.randn(8, 1280, generator=gen) * 0.05,
        "diffusion_model.input_blocks.1.0.in_layers.2.weight::diff::0": torch.randn(320, 320, 3, 3, generator=gen) * 0.005,
    }
    path = tmp_path / "fg_test.safetensors"
    save_file(state, str(path))
    return pack_module("lib_layerdiffuse.patch_files").parse_patch_file(dict(state), path.name)


def _lora_hook_conditioning(cond, strength=1.0):
    """`cond` with a user's ComfyUI LoRA hook (what the core 'Create Hook LoRA' nodes make)."""
    import comfy.hooks

    gen = torch.Generator().manual_seed(6)
    module = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k"
    lora = {f"{module}.lora_up.weight": torch.randn(1280, 4, generator=gen) * 0.2,
            f"{module}.lora_down.weight": torch.randn(4, 768, generator=gen) * 0.2}
    return comfy.hooks.set_hooks_for_conditioning(cond, comfy.hooks.create_hook_lora(lora, strength, 0.0))


def test_weight_patches_stop_at_without_conditioning(sdxl, sd15_model, goldens, tmp_path):
    """The SDXL foreground nodes' stop_at (weight patches, no conditioning passes through the
    node): run on the SD1.5 UNet with same-shape synthetic patches."""
    g = goldens[TRANSPARENT]
    patches = _synthetic_lora_patches(tmp_path)
    high, low = float(g["input.sigma"][0]), 0.5
    stop = percent_between(sd15_model, high, low)
    full = sdxl.apply_weight_patches(sd15_model, patches, 1.0, "test.safetensors")
    stopping = sdxl.apply_weight_patches_until(sd15_model, patches, 1.0, stop)
    full_first, _ = sample_evals(full, g, [high, low])
    base_first, base_second = sample_evals(sd15_model, g, [high, low])
    for _ in range(2):  # the same model samples twice: registration must not pile up
        first, second = sample_evals(stopping, g, [high, low])
        assert (first - full_first).abs().max() < 1e-4  # before stop_at: the patched weights
        assert torch.equal(second, base_second)  # after it: the checkpoint's own weights
    assert (first - base_first).abs().max() > 0.1
    zero = sdxl.apply_weight_patches_until(sd15_model, patches, 1.0, 0.0)
    assert torch.equal(sample_once(zero, g), sample_once(sd15_model, g))
    assert torch.equal(sample_evals(sd15_model, g, [high, low])[1], base_second)  # nothing leaked


def test_weight_patches_stop_at_keeps_the_prompts_own_hooks(sdxl, sd15_model, goldens, tmp_path):
    """A ComfyUI LoRA hook on the prompt still acts alongside the stopping patches, before and
    after stop_at."""
    g = goldens[TRANSPARENT]
    patches = _synthetic_lora_patches(tmp_path)
    high, low = float(g["input.sigma"][0]), 0.5
    stop = percent_between(sd15_model, high, low)
    cond = _lora_hook_conditioning([[g["input.cond_context"], {}]])
    uncond = [[g["input.uncond_context"], {}]]
    hooked_first, hooked_second = sample_evals(sd15_model, g, [high, low], cond, uncond)
    plain_second = sample_evals(sd15_model, g, [high, low])[1]
    assert (hooked_second - plain_second).abs().max() > 1e-3  # the prompt's hook acts
    full = sdxl.apply_weight_patches(sd15_model, patches, 1.0, "test.safetensors")
    full_first, _ = sample_evals(full, g, [high, low], cond, uncond)
    stopping = sdxl.apply_weight_patches_until(sd15_model, patches, 1.0, stop)
    first, second = sample_evals(stopping, g, [high, low], cond, uncond)
    assert (first - full_first).abs().max() < 1e-4 and (first - hooked_first).abs().max() > 0.1
    assert (second - hooked_second).abs().max() < 1e-5


@pytest.fixture(scope="module")
def sdxl_meta(comfyui_path):
    """ComfyUI's SDXL model built from the SDXL checkpoint layout without allocating it."""
    return sdxl_model(torch.float32, meta=True)


@pytest.mark.parametrize("stem", SDXL_PATCH_MANIFESTS)
def test_sdxl_files_map_onto_the_sdxl_unet(sdxl, sdxl_meta, stem):
    patch_files = pack_module("lib_layerdiffuse.patch_files")
    patches = patch_files.parse_patch_file(meta_state(stem), stem)
    shapes = {k: tuple(v.shape) for k, v in sdxl_meta.model_state_dict().items()}
    patch_files.check_against_model(patches, shapes, stem)
    work = sdxl.apply_weight_patches(sdxl_meta, patches, 0.8, "test.safetensors")
    assert set(work.patches) == {p.key for p in patches}
    assert not sdxl_meta.patches  # the input model keeps none


def test_sd15_config_on_sdxl_model_names_both(apply_module, sdxl_meta):
    with pytest.raises(pack_module("lib_layerdiffuse.errors").ModelError) as error:
        apply_module.LayeredDiffusionJointApply.execute(sdxl_meta, "SD15, attn_sharing, Batch size (3N)")
    assert "SD15 models" in str(error.value) and "SDXL (SDXL)" in str(error.value)


# one key per family: attention LoRA q/k/v/out, the widened input conv, ResBlock conv, norm, bias, output conv
FAMILY_KEYS = {
    "layer_xl_transparent_attn": [f"diffusion_model.output_blocks.2.1.transformer_blocks.3.attn{a}.{p}.weight"
                                  for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")],
    "layer_xl_fgble2bg": ["diffusion_model.input_blocks.0.0.weight", "diffusion_model.input_blocks.0.0.bias",
                          "diffusion_model.input_blocks.4.0.in_layers.2.weight",
                          "diffusion_model.middle_block.0.out_layers.0.weight", "diffusion_model.out.2.weight"],
    "layer_xl_bg2ble": ["diffusion_model.input_blocks.0.0.weight", "diffusion_model.output_blocks.2.2.conv.weight"],
}


@pytest.mark.parametrize("stem", sorted(FAMILY_KEYS))
@pytest.mark.parametrize("strength", [1.0, 0.35])
def test_sdxl_patched_weights_are_base_plus_delta(sdxl, sdxl_meta, stem, strength):
    """ComfyUI's own weight patching on the real key names gives the lib's definition of each patch."""
    import comfy.utils
    patch_files = pack_module("lib_layerdiffuse.patch_files")
    layout = manifest(stem)["tensors"]
    wanted = {k: v for k, v in layout.items() if k.split("::")[0] in FAMILY_KEYS[stem]}
    state = {k: torch.from_numpy(synthweights().tensor_values(k, v["shape"])).half() for k, v in wanted.items()}
    patches = patch_files.parse_patch_file(state, stem)
    assert {p.key for p in patches} == set(FAMILY_KEYS[stem])

    work = sdxl.apply_weight_patches(sdxl_meta, patches, strength, "test.safetensors")
    meta_shapes = {p.key: comfy.utils.get_attr(work.model, p.key).shape for p in patches}
    torch.manual_seed(0)
    try:
        for p in patches:
            base = torch.randn(meta_shapes[p.key])
            comfy.utils.set_attr_param(work.model, p.key, base)
            work.patch_weight_to_device(p.key, device_to=torch.device("cpu"))
            got = comfy.utils.get_attr(work.model, p.key)
            expected = patch_files.patched_weight(base, p, strength)
            assert got.shape == expected.shape, p.key
            assert torch.allclose(got, expected, atol=1e-5), p.key
            assert not torch.allclose(pad_like(base, got), got)  # the patch really changed it
            if p.key.endswith("input_blocks.0.0.weight"):
                assert got.shape[1] in (8, 12)
    finally:
        for p in patches:  # back to meta, so the shared fixture stays allocation-free
            comfy.utils.set_attr_param(work.model, p.key, torch.empty(meta_shapes[p.key], device="meta"))
        work.backup.clear()


def pad_like(weight, like):
    out = torch.zeros_like(like)
    out[tuple(slice(0, s) for s in weight.shape)] = weight
    return out


def test_sdxl_cond_node_feeds_the_latent_to_cond_and_uncond(apply_module, sdxl, sdxl_meta, tmp_path, comfyui_path):
    import folder_paths
    from safetensors.torch import save_file

    layout = manifest("layer_xl_fg2ble")["tensors"]
    keep = [k for k in layout if k.startswith("diffusion_model.input_blocks.0.0.") or ".out_layers.3." in k]
    folder = tmp_path / "layer_model"
    folder.mkdir()
    save_file({k: torch.from_numpy(synthweights().tensor_values(k, layout[k]["shape"])).half() for k in keep},
              str(folder / "layer_xl_fg2ble.safetensors"))
    folder_paths.add_model_folder_path("layer_model", str(folder), is_default=True)

    latent = {"samples": torch.randn(1, 4, 8, 8)}
    cond = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]]
    uncond = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    model, cond_out, uncond_out = apply_module.LayeredDiffusionCondApply.execute(
        sdxl_meta, cond, uncond, latent, "SDXL, Foreground", 0.9).result
    assert set(model.patches) == {k.split("::")[0] for k in keep}
    assert all(p[0] == 0.9 for patches in model.patches.values() for p in patches)
    expected = sdxl_meta.model.latent_format.process_in(latent["samples"])
    for out, original in ((cond_out, cond), (uncond_out, uncond)):
        assert torch.equal(out[0][1]["model_conds"]["c_concat"].cond, expected)
        assert out[0][0] is original[0][0] and "model_conds" not in original[0][1]
    # two latents where the file's input conv takes one more: an error, not a shape crash mid-sampling
    modes = pack_module("nodes.modes")
    cond_mode = modes.find_mode(modes.COND_MODES, "SDXL, Foreground")
    with pytest.raises(pack_module("lib_layerdiffuse.errors").ModelError, match="expects 4 concat channels, got 8"):
        sdxl.apply_concat_mode(sdxl_meta, cond_mode, cond, uncond, [latent, latent], 1.0)
