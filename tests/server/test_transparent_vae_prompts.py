"""The transparent VAE nodes on a live ComfyUI server: what /object_info lists, prompts that decode
and encode and save RGBA PNGs, errors that stay execution errors, a shipped workflow."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from support.images import rgba_disc, save_rgba_png
from support.server import assert_success
from support.workflow_runs import size_mismatch_prompt
from support.workflows import load_api

OUR_NODES = ["LayeredDiffusionDecode", "LayeredDiffusionDecodeRGBA", "LayeredDiffusionDecodeSplit",
             "LayeredDiffusionEncode", "LayeredDiffusionCheckerboard"]


def test_object_info_lists_our_nodes(comfy_server):
    info = comfy_server.get("/object_info")
    for node_id in OUR_NODES:
        assert node_id in info, node_id
    decode = info["LayeredDiffusionDecodeSplit"]
    assert decode["input_order"]["required"] == ["samples", "images", "frames", "sd_version", "sub_batch_size"]
    assert decode["input_order"]["optional"] == ["passes", "precision"]
    assert decode["output"] == ["IMAGE", "IMAGE", "IMAGE"]


def _assert_rgba_pngs(server, entry, node_id, size, count):
    files = server.output_files(entry, node_id)
    assert len(files) == count
    for path in files:
        with Image.open(path) as png:
            assert png.mode == "RGBA" and png.size == size
            alpha = np.asarray(png.getchannel("A"))
            assert alpha.shape == (size[1], size[0])


def test_decode_prompts_save_pngs_with_alpha(comfy_server):
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15_synthetic.safetensors"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 200, "height": 120, "batch_size": 2}},
        "vae_decode": {"class_type": "VAEDecode", "inputs": {"samples": ["latent", 0], "vae": ["ckpt", 2]}},
        "rgba": {"class_type": "LayeredDiffusionDecodeRGBA",
                 "inputs": {"samples": ["latent", 0], "images": ["vae_decode", 0], "sd_version": "SD15", "sub_batch_size": 1}},
        "save_rgba": {"class_type": "SaveImage", "inputs": {"images": ["rgba", 0], "filename_prefix": "rgba"}},
        "decode": {"class_type": "LayeredDiffusionDecode",
                   "inputs": {"samples": ["latent", 0], "images": ["vae_decode", 0], "sd_version": "SD15", "sub_batch_size": 16}},
        "join": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["decode", 0], "alpha": ["invert", 0]}},
        "invert": {"class_type": "InvertMask", "inputs": {"mask": ["decode", 1]}},
        "save_joined": {"class_type": "SaveImage", "inputs": {"images": ["join", 0], "filename_prefix": "joined"}},
        "split": {"class_type": "LayeredDiffusionDecodeSplit",
                  "inputs": {"samples": ["latent", 0], "images": ["vae_decode", 0], "frames": 2, "sd_version": "SD15",
                             "sub_batch_size": 16}},
        "save_split": {"class_type": "SaveImage", "inputs": {"images": ["split", 0], "filename_prefix": "split"}},
        "preview": {"class_type": "LayeredDiffusionCheckerboard", "inputs": {"image": ["rgba", 0], "square": 16}},
        "save_preview": {"class_type": "SaveImage", "inputs": {"images": ["preview", 0], "filename_prefix": "preview"}},
    }
    entry = comfy_server.run(prompt)
    assert_success(entry)
    _assert_rgba_pngs(comfy_server, entry, "save_rgba", (200, 120), 2)
    _assert_rgba_pngs(comfy_server, entry, "save_joined", (200, 120), 2)
    _assert_rgba_pngs(comfy_server, entry, "save_split", (200, 120), 1)
    with Image.open(comfy_server.output_files(entry, "save_rgba")[0]) as a, \
            Image.open(comfy_server.output_files(entry, "save_joined")[0]) as b:
        # Decode + inverted mask + core JoinImageWithAlpha is Decode (RGBA); sub-batches of 1 and 16
        # differ by float rounding, at most one 8-bit level.
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


def _encode_nodes(png_name: str) -> dict:
    """Prompt nodes that load the SD1.5 checkpoint and the input PNG and encode it ("encode")."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15_synthetic.safetensors"}},
        "load": {"class_type": "LoadImage", "inputs": {"image": png_name}},
        "encode": {"class_type": "LayeredDiffusionEncode",
                   "inputs": {"vae": ["ckpt", 2], "image": ["load", 0], "mask": ["load", 1], "sd_version": "SD15"}},
    }


def test_encode_prompt_round_trips_an_rgba_png(comfy_server):
    save_rgba_png(rgba_disc(64, 96), comfy_server.base / "input" / "disc.png")
    prompt = {
        **_encode_nodes("disc.png"),
        "vae_decode": {"class_type": "VAEDecode", "inputs": {"samples": ["encode", 0], "vae": ["ckpt", 2]}},
        "rgba": {"class_type": "LayeredDiffusionDecodeRGBA",
                 "inputs": {"samples": ["encode", 0], "images": ["vae_decode", 0], "sd_version": "SD15", "sub_batch_size": 16}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["rgba", 0], "filename_prefix": "roundtrip"}},
    }
    entry = comfy_server.run(prompt)
    assert_success(entry)
    _assert_rgba_pngs(comfy_server, entry, "save", (96, 64), 1)


def test_bad_input_is_an_execution_error_not_a_crash(comfy_server):
    entry = comfy_server.run(size_mismatch_prompt("bad"))
    assert entry["status"]["status_str"] == "error"
    errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "size mismatch" in errors[0][1]["exception_message"]
    # The error's title is the pack's short name, not the module path of the pack's folder.
    assert errors[0][1]["exception_type"] == "layerdiffuse.InputError"
    assert comfy_server.get("/system_stats")  # still serving


def test_shipped_api_workflow_runs(comfy_server):
    prompt = load_api("sd15_transparent_decode")
    prompt["1"]["inputs"]["ckpt_name"] = "sd15_synthetic.safetensors"
    prompt["4"]["inputs"].update(width=64, height=64)
    prompt["5"]["inputs"]["steps"] = 2
    entry = comfy_server.run(prompt)
    assert_success(entry)
    _assert_rgba_pngs(comfy_server, entry, "8", (64, 64), 1)


def test_encode_through_the_server_is_the_reference_latent(comfy_server, comfyui_path):
    """Load Image -> Layer Diffuse Encode (RGBA) -> Save Latent on the live server gives the
    reference's latent: the VAE posterior mean plus std times the offset encoder's output, with
    the image flattened on 8-bit grey (127, 127, 127) for the VAE, as the reference does."""
    import comfy.sd
    from safetensors import safe_open
    from safetensors.torch import load_file

    save_rgba_png(rgba_disc(64, 96), comfy_server.base / "input" / "encode_reference.png")
    prompt = {
        **_encode_nodes("encode_reference.png"),
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["encode", 0], "filename_prefix": "encoded"}},
    }
    entry = comfy_server.run(prompt)
    assert_success(entry)
    (saved,) = entry["outputs"]["save"]["latents"]
    latent = load_file(str(comfy_server.base / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]

    # The reference, computed here from the same files: the PNG as LoadImage reads it (8-bit),
    rgba = torch.from_numpy(np.array(Image.open(comfy_server.base / "input" / "encode_reference.png"))).float() / 255
    rgb, alpha = rgba[..., :3].movedim(-1, 0)[None], rgba[..., 3][None, None]
    # the checkpoint's VAE encoder on the image over 8-bit grey, to moments,
    with safe_open(str(comfy_server.base / "models" / "checkpoints" / "sd15_synthetic.safetensors"), "pt") as f:
        vae = comfy.sd.VAE(sd={k.removeprefix("first_stage_model."): f.get_tensor(k).float()
                               for k in f.keys() if k.startswith("first_stage_model.")})
    grey = 127 / 255
    with torch.no_grad():
        moments = vae.first_stage_model.encoder((grey + (rgb - grey) * alpha) * 2 - 1)
        moments = vae.first_stage_model.quant_conv(moments)
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    # and the offset encoder on (alpha, padded RGB).
    from lib_layerdiffuse.vae_family import SD
    from lib_layerdiffuse.offset_encoder import LatentTransparencyOffsetEncoder
    from lib_layerdiffuse.weight_files import build_model, read_safetensors

    encoder_file = comfy_server.base / "models" / "layer_model" / "layer_sd15_vae_transparent_encoder.safetensors"
    encoder = build_model(LatentTransparencyOffsetEncoder, read_safetensors(str(encoder_file)), encoder_file.name)
    with torch.no_grad():
        offset = encoder(SD.feed(rgb, alpha))
    reference = mean + std * offset
    relative = (latent - reference).norm() / reference.norm()
    assert relative < 1e-3, float(relative)
