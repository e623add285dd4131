"""The Flux nodes inside a real ComfyUI (CPU): the chain goldens through ComfyUI's own VAE, the
LoRA's key mapping through comfy.lora, the .pth conversion on first use, and the workflows
against a live server."""
from __future__ import annotations

import collections
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import PACK_ROOT

ATOL = 1e-4
ATOL_X300 = 1e-3
FLUX_NODES = ["LayeredDiffusionFluxApply", "LayeredDiffusionFluxVAELoader", "LayeredDiffusionFluxDecode",
              "LayeredDiffusionFluxEncode"]
WORKFLOWS = ["flux_transparent_t2i", "flux_transparent_img2img"]
# What comfy.model_detection makes of a FLUX.1-dev checkpoint (also the layerlora manifest's config).
FLUX_DEV_CONFIG = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
                   "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
                   "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
                   "guidance_embed": True, "txt_ids_dims": []}


def pack_module(name: str):
    """A module of this pack as ComfyUI's loader imported it (its name is the pack's path)."""
    import sys

    for module_name, module in list(sys.modules.items()):
        if module_name.endswith("." + name) and str(getattr(module, "__file__", "")).startswith(str(PACK_ROOT)):
            return module
    raise LookupError(name)


def run_node(pack, node_id, **inputs):
    result = pack.NODE_CLASS_MAPPINGS[node_id].execute(**inputs)
    return result.result if hasattr(result, "result") else result


def _rgba_test_image(height: int, width: int) -> torch.Tensor:
    """[1,H,W,4]: an opaque orange square with a soft edge on a transparent background."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    edge = torch.minimum(torch.minimum(ys, height - 1 - ys), torch.minimum(xs, width - 1 - xs)).float()
    alpha = ((edge - height / 6) / 4).clamp(0, 1)
    colour = torch.stack([torch.ones_like(alpha), 0.5 * torch.ones_like(alpha), ys / height], -1)
    return torch.cat([colour, alpha[..., None]], -1)[None].float()


@pytest.fixture(scope="module")
def golden(testkit):
    return load_file(str(testkit / "goldens" / "flux_transparent_vae_seed0.safetensors"))


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory, synth_weights):
    """A layer_model folder with a float32 synthetic TransparentVAE.safetensors (the goldens' weights)."""
    folder = tmp_path_factory.mktemp("flux_layer_model")
    source = synth_weights("flux_transparent_vae", dtype="float32")
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

def test_flux_nodes_register_through_comfyui_loader(pack):
    for node_id in FLUX_NODES:
        schema = pack.NODE_CLASS_MAPPINGS[node_id].define_schema()
        assert schema.category == "layer_diffuse/flux"
        assert all(i.tooltip for i in schema.inputs), f"{node_id} has inputs without tooltips"


# --- the chain goldens through ComfyUI's VAE --------------------------------------------------------

def test_vae_from_the_file_is_a_flux_vae(flux_vae, golden):
    assert flux_vae.latent_channels == 16 and flux_vae.vae_dtype == torch.float32
    assert type(flux_vae.first_stage_model.regularization).__name__ == "DiagonalGaussianRegularizer"
    pixel = pack_module("nodes.flux").decode_unclamped(flux_vae, golden["decoder.latent"])
    torch.testing.assert_close(pixel, golden["chain.origin_pixel"], atol=ATOL, rtol=0)
    # The decoder needs these unclamped values: ComfyUI's VAE.decode would clamp them.
    assert pixel.min() < -0.5 and pixel.max() > 1.2
    torch.testing.assert_close(flux_vae.decode(golden["decoder.latent"]), pixel.clamp(0, 1).movedim(1, -1),
                               atol=ATOL, rtol=0)


def test_decode_node_matches_the_chain_golden(pack, flux_vae, golden):
    image, mask = run_node(pack, "LayeredDiffusionFluxDecode", samples={"samples": golden["decoder.latent"]},
                           vae=flux_vae, sub_batch_size=4)
    assert image.shape == (1, 64, 64, 4) and image.dtype == torch.float32
    torch.testing.assert_close(image, golden["chain.decoded"].movedim(1, -1), atol=ATOL, rtol=0)
    assert torch.equal(mask, image[..., 3])

    import comfy.model_management

    loaded = [m.model for m in comfy.model_management.current_loaded_models]
    assert any(type(getattr(m, "model", None)).__name__ == "UNet1024" for m in loaded), "not managed by ComfyUI"


def test_encode_node_matches_the_chain_golden(pack, flux_vae, golden):
    image = golden["encoder_pipeline.rgba_uint8"].float() / 255
    rgb, alpha = image[..., :3].movedim(-1, 1), image[..., 3:].movedim(-1, 1)
    mean, std = pack_module("nodes.transparent_vae").vae_posterior(flux_vae, 0.5 + (rgb - 0.5) * alpha)
    torch.testing.assert_close(mean, golden["chain.posterior_mean"], atol=ATOL_X300, rtol=0)
    torch.testing.assert_close(std, golden["chain.posterior_std"], atol=ATOL_X300, rtol=0)

    (latent,) = run_node(pack, "LayeredDiffusionFluxEncode", vae=flux_vae, image=image)
    torch.testing.assert_close(latent["samples"], golden["chain.latent_raw"], atol=ATOL_X300, rtol=0)
    # The same image as RGB plus LoadImage's mask (1 = transparent) is the same latent.
    (again,) = run_node(pack, "LayeredDiffusionFluxEncode", vae=flux_vae, image=image[..., :3], mask=1 - image[..., 3])
    torch.testing.assert_close(again["samples"], latent["samples"], atol=ATOL, rtol=1e-5)  # 1 - (1 - a) rounding
    # What the sampler sees is ComfyUI's Flux latent format applied to it: the port's model-space latent.
    import comfy.latent_formats

    model_space = comfy.latent_formats.Flux().process_in(latent["samples"])
    torch.testing.assert_close(model_space, golden["chain.latent"], atol=ATOL_X300, rtol=0)


def test_any_size_round_trips_and_bad_inputs_say_what_to_connect(pack, flux_vae):
    image = _rgba_test_image(72, 104)
    (latent,) = run_node(pack, "LayeredDiffusionFluxEncode", vae=flux_vae, image=image)
    assert latent["samples"].shape == (1, 16, 9, 13)
    rgba, mask = run_node(pack, "LayeredDiffusionFluxDecode", samples=latent, vae=flux_vae, sub_batch_size=1)
    assert rgba.shape == (1, 72, 104, 4) and mask.shape == (1, 72, 104)
    assert rgba.min() >= 0 and rgba.max() <= 1

    with pytest.raises(pack_module("lib_layerdiffuse.errors").InputError, match=r"expected a Flux latent \[B,16,h,w\], got shape \[1, 4, 8, 8\]"):
        run_node(pack, "LayeredDiffusionFluxDecode", samples={"samples": torch.zeros(1, 4, 8, 8)}, vae=flux_vae,
                 sub_batch_size=1)

    class SDVae:  # the only property the check reads; a real SD VAE needs a 2 GB synthetic checkpoint
        latent_channels = 4

    with pytest.raises(pack_module("lib_layerdiffuse.errors").ModelError, match="4-channel latents; connect the Flux VAE"):
        run_node(pack, "LayeredDiffusionFluxEncode", vae=SDVae(), image=image)


def test_decode_passes_and_progress(pack, flux_vae, golden, monkeypatch):
    import comfy.utils

    updates = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: updates.append((value, total)))
    latent = golden["decoder.latent"].repeat(3, 1, 1, 1)
    image, _ = run_node(pack, "LayeredDiffusionFluxDecode", samples={"samples": latent}, vae=flux_vae,
                        sub_batch_size=2, passes="1", precision="float32")
    assert updates == [(1, 2), (2, 2)]
    # One pass is the clipped single pass of the decoder on the unclamped pixels.
    decoder = pack_module("nodes.flux").network("decoder", pack_module("lib_layerdiffuse.flux_vae").decoder,
                                                 torch.float32).model
    with torch.no_grad():
        single = decoder(golden["chain.origin_pixel"], golden["decoder.latent"]).clamp(0, 1)
    for row in image:
        torch.testing.assert_close(row, single[0].movedim(0, -1), atol=ATOL, rtol=0)


# --- weight files ---------------------------------------------------------------------------------

def test_pth_is_converted_on_first_use_and_missing_files_name_the_url(pack, tmp_path, monkeypatch, testkit):
    import folder_paths
    import importlib.util

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model", ([str(tmp_path)], {".safetensors"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weight_files = pack_module("lib_layerdiffuse.weight_files")
    with pytest.raises(weight_files.WeightFileError) as error:
        run_node(pack, "LayeredDiffusionFluxVAELoader")
    text = str(error.value)
    assert "https://huggingface.co/RedAIGC/Flux-version-LayerDiffuse/resolve/main/TransparentVAE.pth" in text
    assert str(tmp_path) in text

    spec = importlib.util.spec_from_file_location("synthweights", testkit / "synthweights.py")
    sw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sw)
    manifest = sw.load_manifest(str(testkit / "manifests" / "flux_transparent_vae.json"))
    torch.save(collections.OrderedDict(sw.make_state_dict(manifest, seed=0)), str(tmp_path / "TransparentVAE.pth"))
    (vae,) = run_node(pack, "LayeredDiffusionFluxVAELoader")
    assert vae.latent_channels == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TransparentVAE.pth", "TransparentVAE.safetensors"]
    assert (tmp_path / "TransparentVAE.safetensors").stat().st_size == manifest["expected_file_bytes"]
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
def layerlora(synth_weights):
    return synth_weights("flux_layerlora")


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


def test_lora_keys_that_fit_nothing_are_an_error(pack, flux_dev_on_meta):
    flux = pack_module("nodes.flux")
    weight_files = pack_module("lib_layerdiffuse.weight_files")
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4),
            "lora_unet_double_blocks_99_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072)}
    with pytest.raises(weight_files.WeightFileError, match="1 LoRA keys do not fit.*double_blocks_99"):
        flux.apply_lora(flux_dev_on_meta, lora, 1.0, "layerlora.safetensors")
    assert len(flux.apply_lora(flux_dev_on_meta, dict(list(lora.items())[:2]), 1.0, "x").patches) == 1

    class SD15Config:
        unet_config = {"in_channels": 4}

    class SD15Model:
        model_config = SD15Config()

    class SD15Patcher:
        model = SD15Model()

    with pytest.raises(pack_module("lib_layerdiffuse.errors").ModelError, match="the model is not FLUX.1"):
        run_node(pack, "LayeredDiffusionFluxApply", model=SD15Patcher(), strength=1.0)


# --- workflows and the live server -----------------------------------------------------------------

def _load_workflow(name: str, api: bool) -> dict:
    folder = PACK_ROOT / "workflows" / ("api" if api else "")
    return json.loads((folder / f"{name}.json").read_text())


def _input_spec(info: dict, class_type: str, name: str):
    for group in ("required", "optional"):
        if name in info[class_type]["input"].get(group, {}):
            return info[class_type]["input"][group][name]
    return None


FILE_COMBOS = {"unet_name", "clip_name1", "clip_name2", "image"}  # depend on the user's files


def _check_widget(spec, value, where):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options["options"]
        assert value in choices, (where, value)
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and options.get("min", value) <= value <= options.get("max", value), (where, value)
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_workflows_fit_the_live_object_info(comfy_server, name):
    info = comfy_server.get("/object_info")
    prompt = _load_workflow(name, api=True)
    for node_id, node in prompt.items():
        class_type = node["class_type"]
        assert class_type in info, (node_id, class_type)
        required = info[class_type]["input"].get("required", {})
        assert set(required) <= set(node["inputs"]), (node_id, set(required) - set(node["inputs"]))
        for input_name, value in node["inputs"].items():
            spec = _input_spec(info, class_type, input_name)
            assert spec is not None, (node_id, input_name)
            if isinstance(value, list):
                source, slot = value
                assert source in prompt, (node_id, input_name)
                assert info[prompt[source]["class_type"]]["output"][slot] == spec[0], (node_id, input_name)
            elif input_name not in FILE_COMBOS:
                _check_widget(spec, value, (node_id, input_name))
    assert any(info[n["class_type"]].get("output_node") for n in prompt.values())


def _widget_names(info_node: dict) -> list[str]:
    names = []
    for group in ("required", "optional"):
        for input_name, spec in info_node["input"].get(group, {}).items():
            kind = spec[0]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(input_name)
                options = spec[1] if len(spec) > 1 else {}
                if options.get("control_after_generate"):
                    names.append("control_after_generate")
                if options.get("image_upload"):
                    names.append("upload")
    return names


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflows_fit_the_live_object_info_and_match_the_api_ones(comfy_server, name):
    info = comfy_server.get("/object_info")
    graph = _load_workflow(name, api=False)
    nodes = {n["id"]: n for n in graph["nodes"]}
    links = {link[0]: link for link in graph["links"]}
    assert len(links) == len(graph["links"]) and graph["last_link_id"] >= max(links)
    notes = [n for n in nodes.values() if n["type"] in ("Note", "MarkdownNote")]
    assert notes, "the workflow should carry download and memory notes"
    text = " ".join(n["widgets_values"][0] for n in notes)
    assert "huggingface.co" in text and "memory" in text.lower()
    for node in nodes.values():
        if node in notes:
            continue
        node_info = info[node["type"]]
        widgets = _widget_names(node_info)
        assert len(node.get("widgets_values", [])) == len(widgets), (node["type"], widgets)
        for widget, value in zip(widgets, node.get("widgets_values", [])):
            if widget not in FILE_COMBOS and widget not in ("control_after_generate", "upload"):
                _check_widget(_input_spec(info, node["type"], widget), value, (node["type"], widget))
        for slot in node.get("inputs", []):
            spec = _input_spec(info, node["type"], slot["name"])
            assert spec is not None and spec[0] == slot["type"], (node["type"], slot["name"])
            if slot.get("link") is not None:
                link = links[slot["link"]]
                assert link[3] == node["id"] and link[5] == slot["type"]
                source = nodes[link[1]]
                assert node_info and info[source["type"]]["output"][link[2]] == slot["type"]
        for index, out in enumerate(node.get("outputs", [])):
            assert node_info["output"][index] == out["type"], (node["type"], index)
    # Same nodes as the API version.
    api = _load_workflow(name, api=True)
    assert sorted(n["type"] for n in nodes.values() if n not in notes) == sorted(n["class_type"] for n in api.values())


@pytest.fixture(scope="module")
def flux_server(server_models, synth_weights, comfy_server):
    """The live server with a synthetic TransparentVAE and empty stand-ins for the FLUX.1-dev files
    (enough for /prompt's validation; loading them fails, as it should)."""
    base = server_models
    source = synth_weights("flux_transparent_vae")
    target = base / "models" / "layer_model" / source.name
    if not target.exists():
        target.symlink_to(source)
    for folder, names in (("diffusion_models", ["flux1-dev.safetensors"]),
                          ("text_encoders", ["clip_l.safetensors", "t5xxl_fp16.safetensors"])):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        for file_name in names:
            (base / "models" / folder / file_name).touch()
    rgba = (_rgba_test_image(64, 64)[0].numpy() * 255).round().astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(base / "input" / "transparent_input.png")
    return comfy_server


def test_object_info_lists_the_flux_nodes(flux_server):
    info = flux_server.get("/object_info")
    assert info["LayeredDiffusionFluxDecode"]["input_order"] == {
        "required": ["samples", "vae", "sub_batch_size"], "optional": ["passes", "precision"]}
    assert info["LayeredDiffusionFluxDecode"]["output"] == ["IMAGE", "MASK"]
    assert info["LayeredDiffusionFluxEncode"]["input_order"] == {"required": ["vae", "image"], "optional": ["mask"]}
    assert info["LayeredDiffusionFluxApply"]["output"] == ["MODEL"]
    assert info["LayeredDiffusionFluxVAELoader"]["output"] == ["VAE"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_workflows_pass_the_servers_validation(flux_server, name):
    """/prompt accepts the shipped workflows as they are; they then fail only where the
    stand-in FLUX.1-dev files are loaded."""
    entry = flux_server.run(_load_workflow(name, api=True))
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] in ("UNETLoader", "DualCLIPLoader"), errors


def _assert_rgba_png(path: Path, size):
    with Image.open(path) as png:
        assert png.mode == "RGBA" and png.size == size
        alpha = np.asarray(png.getchannel("A"))
        assert alpha.min() < alpha.max()


def test_flux_decode_and_encode_prompts_save_rgba_pngs(flux_server):
    prompt = {
        "vae": {"class_type": "LayeredDiffusionFluxVAELoader", "inputs": {}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "decode": {"class_type": "LayeredDiffusionFluxDecode",
                   "inputs": {"samples": ["latent", 0], "vae": ["vae", 0], "sub_batch_size": 2, "passes": "8",
                              "precision": "auto"}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "flux_t2i"}},
        "load": {"class_type": "LoadImage", "inputs": {"image": "transparent_input.png"}},
        "encode": {"class_type": "LayeredDiffusionFluxEncode",
                   "inputs": {"vae": ["vae", 0], "image": ["load", 0], "mask": ["load", 1]}},
        "decode_again": {"class_type": "LayeredDiffusionFluxDecode",
                         "inputs": {"samples": ["encode", 0], "vae": ["vae", 0], "sub_batch_size": 4, "passes": "4",
                                    "precision": "auto"}},
        "save_again": {"class_type": "SaveImage", "inputs": {"images": ["decode_again", 0], "filename_prefix": "flux_i2i"}},
    }
    entry = flux_server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    files = flux_server.output_files(entry, "save")
    assert len(files) == 2
    for path in files:
        with Image.open(path) as png:
            assert png.mode == "RGBA" and png.size == (64, 64)
    (round_trip,) = flux_server.output_files(entry, "save_again")
    _assert_rgba_png(round_trip, (64, 64))
