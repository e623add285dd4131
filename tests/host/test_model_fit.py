"""Models and LoRA files that do not fit (nodes/modes.py family detection, nodes/lora_fit.py), in
the real ComfyUI: every Apply node refuses a model of another family with an error that names
the node and the cure, and a LoRA key that fits no weight is an error found by comparing keys."""
from __future__ import annotations

import logging

import pytest
import torch

from support.pack import pack_module, run_node

# What comfy.model_detection makes of the checkpoints (the parts the family classes match on).
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
            "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
            "guidance_embed": True, "txt_ids_dims": []}
CONFIGS = {  # name -> (supported_models class, unet_config, family)
    "SD15": ("SD15", {"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False,
                      "adm_in_channels": None, "use_temporal_attention": False, "in_channels": 4}, "SD15"),
    "SDXL": ("SDXL", {"model_channels": 320, "use_linear_in_transformer": True, "transformer_depth": [0, 0, 2, 2, 10, 10],
                      "context_dim": 2048, "adm_in_channels": 2816, "use_temporal_attention": False,
                      "in_channels": 4}, "SDXL"),
    "SD3": ("SD3", {"in_channels": 16, "pos_embed_scaling_factor": None}, None),
    "Flux": ("Flux", FLUX_DEV, "FLUX"),
    "FluxInpaint": ("FluxInpaint", {**FLUX_DEV, "in_channels": 96}, None),
}
SD_NODES = {  # node id -> (display name, inputs besides the model)
    "LayeredDiffusionApply": ("Layer Diffuse Apply", dict(config="SDXL, Conv Injection", weight=1.0)),
    "LayeredDiffusionJointApply": ("Layer Diffuse Joint Apply", dict(config="SD15, attn_sharing, Batch size (3N)")),
    "LayeredDiffusionCondApply": ("Layer Diffuse Cond Apply", dict(
        cond=[], uncond=[], latent={"samples": torch.zeros(1, 4, 8, 8)}, config="SDXL, Foreground", weight=1.0)),
    "LayeredDiffusionCondJointApply": ("Layer Diffuse Cond Joint Apply", dict(
        image=torch.zeros(1, 64, 64, 3), config="SD15, Foreground, attn_sharing, Batch size (2N)")),
    "LayeredDiffusionDiffApply": ("Layer Diffuse Diff Apply", dict(
        cond=[], uncond=[], blended_latent={"samples": torch.zeros(1, 4, 8, 8)},
        latent={"samples": torch.zeros(1, 4, 8, 8)}, config="SDXL, Foreground", weight=1.0)),
}


class _Model:
    """A model as far as family detection reads it (`model.model.model_config`), holding ComfyUI's
    own config object for the checkpoint."""

    def __init__(self, name: str):
        import comfy.supported_models

        class_name, unet_config, _ = CONFIGS[name]
        config = getattr(comfy.supported_models, class_name)(dict(unet_config))

        class Inner:
            model_config = config
        self.model = Inner()


def _model_error():
    return pack_module("lib_layerdiffuse.errors").ModelError


@pytest.mark.parametrize("name", CONFIGS)
def test_one_function_tells_the_families_apart(pack, name):
    assert pack_module("nodes.modes").model_family(_Model(name)) == CONFIGS[name][2]


@pytest.mark.parametrize("node_id", SD_NODES)
@pytest.mark.parametrize("name,cure", [("SD3", "load an SD1.5 or SDXL checkpoint"),
                                       ("Flux", "For FLUX.1 use Layer Diffuse Flux Apply"),
                                       ("FluxInpaint", "load an SD1.5 or SDXL checkpoint")])
def test_sd_nodes_refuse_another_family(pack, node_id, name, cure):
    display, inputs = SD_NODES[node_id]
    with pytest.raises(_model_error()) as error:
        run_node(pack, node_id, model=_Model(name), **inputs)
    message = str(error.value)
    assert message.startswith(f"{display}: this node works with SD1.5 and SDXL models")
    assert CONFIGS[name][0] in message and cure in message


@pytest.mark.parametrize("node_id", SD_NODES)
def test_a_config_of_the_other_sd_family_names_the_node_and_the_cure(pack, node_id):
    display, inputs = SD_NODES[node_id]
    modes = pack_module("nodes.modes")
    model_name = "SD15" if "SDXL" in inputs["config"] else "SDXL"
    with pytest.raises(_model_error()) as error:
        run_node(pack, node_id, model=_Model(model_name), **inputs)
    message = str(error.value)
    wanted = "SDXL" if model_name == "SD15" else "SD15"
    assert message.startswith(f"{display}: the config '{inputs['config']}' is for {wanted} models")
    assert f"Choose a {model_name} config, or load a {wanted} checkpoint" in message
    assert modes.model_family(_Model(model_name)) == model_name


@pytest.mark.parametrize("name", ["SD15", "SDXL", "SD3", "FluxInpaint"])
def test_flux_apply_refuses_another_family(pack, name):
    with pytest.raises(_model_error()) as error:
        run_node(pack, "LayeredDiffusionFluxApply", model=_Model(name), strength=1.0)
    message = str(error.value)
    assert message.startswith("Layer Diffuse Flux Apply: the LayerDiffuse-Flux LoRA is for FLUX.1-dev")
    assert "Connect a FLUX.1-dev model" in message
    assert ("use Layer Diffuse Apply" in message) == (name in ("SD15", "SDXL"))


# --- LoRA fit, by comparing keys ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_dev_on_meta(pack):
    """FLUX.1-dev as ComfyUI builds it, on the meta device (key names and shapes only)."""
    import comfy.model_detection
    import comfy.model_patcher

    model_config = comfy.model_detection.model_config_from_unet_config(dict(FLUX_DEV))
    model_config.set_inference_dtype(torch.bfloat16, None)
    with torch.device("meta"):
        model = model_config.get_model({}, "")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


QKV = "lora_unet_double_blocks_0_img_attn_qkv"


def test_flux_lora_keys_that_fit_nothing_are_an_error(pack, flux_dev_on_meta):
    flux = pack_module("nodes.flux_weights")
    lora = {f"{QKV}.lora_down.weight": torch.zeros(4, 3072), f"{QKV}.lora_up.weight": torch.zeros(9216, 4),
            "lora_unet_double_blocks_99_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072)}
    handlers = list(logging.getLogger().handlers)
    with pytest.raises(pack_module("lib_layerdiffuse.errors").WeightFileError,
                       match=r"layerlora.safetensors: 1 of its 3 keys fit no weight .*double_blocks_99.*FLUX.1-dev"):
        flux.apply_lora(flux_dev_on_meta, lora, 1.0, "layerlora.safetensors")
    assert logging.getLogger().handlers == handlers
    patched = flux.apply_lora(flux_dev_on_meta, dict(list(lora.items())[:2]), 1.0, "x")
    assert list(patched.patches) == ["diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    assert not flux_dev_on_meta.patches


def test_a_lora_key_ComfyUI_does_not_patch_is_an_error(pack, flux_dev_on_meta):
    """A key that names a weight but carries nothing ComfyUI loads (an alpha alone) patches nothing."""
    with pytest.raises(pack_module("lib_layerdiffuse.errors").ModelError, match="ComfyUI did not patch 1 weights"):
        pack_module("nodes.flux_weights").apply_lora(flux_dev_on_meta, {f"{QKV}.alpha": torch.tensor(4.0)}, 1.0, "x")


def test_sdxl_patches_that_fit_nothing_are_an_error(pack, flux_dev_on_meta):
    """The SDXL patch files go through the same check (here onto a model they do not fit)."""
    patch_files = pack_module("lib_layerdiffuse.patch_files")
    key = "diffusion_model.input_blocks.4.1.proj_in.weight"
    patch = patch_files.WeightPatch(key=key, kind=patch_files.DIFF, diff=torch.zeros(640, 640))
    with pytest.raises(pack_module("lib_layerdiffuse.errors").WeightFileError,
                       match=r"layer_xl_fg2ble.safetensors: 1 of its 1 keys fit no weight .*input_blocks.4.1.proj_in"):
        pack_module("nodes.sdxl_patches").apply_weight_patches(flux_dev_on_meta, [patch], 1.0,
                                                               "layer_xl_fg2ble.safetensors")
