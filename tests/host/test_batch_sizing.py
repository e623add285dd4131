"""Batches sized by the memory ComfyUI reports free: the decode, the encode and the RGBA upscale split a
batch to fit, and an image that cannot fit is refused before anything is allocated."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from support.pack import pack_module, run_node
from support.paths import PACK_ROOT
from support.synth import synthetic_file

GIB = 1 << 30
BENCHMARK = PACK_ROOT / "benchmarks" / "bench_batch_memory.py"


@pytest.fixture()
def decoder_dir(pack, tmp_path, monkeypatch):
    import folder_paths

    for stem in ("layer_sd15_vae_transparent_decoder", "layer_sd15_vae_transparent_encoder"):
        source = synthetic_file(stem)
        (tmp_path / source.name).symlink_to(source)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def _report_free(monkeypatch, free: int) -> None:
    """ComfyUI reports `free` bytes free on every device (the host reading; the decode is real)."""
    import comfy.model_management

    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda dev=None, torch_free_too=False: free)


def _spy(monkeypatch, module, name: str, argument: int = 0) -> list[int]:
    """The batch sizes of the `argument`-th argument `module.name` is called with, call by call."""
    sizes, original = [], getattr(module, name)

    def spy(*args, **kwargs):
        sizes.append(args[argument].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return sizes


def _sub_batches(monkeypatch) -> list[int]:
    """The sizes of the sub-batches the transparent decoder runs."""
    return _spy(monkeypatch, pack_module("lib_layerdiffuse.transparent_vae"), "decode_augmented", argument=1)


def _decode(pack, images, latent, sub_batch_size=16, passes="1"):
    (rgba,) = run_node(pack, "LayeredDiffusionDecodeRGBA", samples={"samples": latent}, images=images,
                       sd_version="SD15", sub_batch_size=sub_batch_size, passes=passes)
    return rgba


def test_decode_splits_by_the_reported_free_memory(pack, decoder_dir, monkeypatch):
    images, latent = torch.rand(5, 64, 64, 3), torch.randn(5, 4, 8, 8)
    memory = pack_module("lib_layerdiffuse.batch_memory").decoder_memory(64, 64, 5, 4, 1, True)
    sizes = _sub_batches(monkeypatch)
    results = []
    for fitting, sub_batch_size, expected in ((1, 16, [1] * 5), (2, 16, [2, 2, 1]), (3, 16, [3, 2]),
                                              (3, 2, [2, 2, 1]), (100, 16, [5])):
        sizes.clear()
        _report_free(monkeypatch, memory.for_images(fitting) + memory.per_image // 2)
        results.append(_decode(pack, images, latent, sub_batch_size))
        assert sizes == expected, (fitting, sub_batch_size)
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], atol=1e-4, rtol=0)


def test_an_image_that_cannot_fit_is_refused_before_anything_is_allocated(pack, decoder_dir, monkeypatch):
    """8192x8192 with 16 GiB free. The inputs are expanded views, so a decode that started would
    allocate gigabytes."""
    _report_free(monkeypatch, 16 * GIB)
    sizes = _sub_batches(monkeypatch)
    images = torch.zeros(1, 1, 1, 3).expand(1, 8192, 8192, 3)
    latent = torch.zeros(1, 4, 1, 1).expand(1, 4, 1024, 1024)
    errors = pack_module("lib_layerdiffuse.errors")
    with pytest.raises(errors.InputError) as error:
        _decode(pack, images, latent, passes="8")
    text = str(error.value)
    assert text.startswith("Layer Diffuse Decode (RGBA): the transparent decoder (8192x8192, float32, 8 passes) "
                           "needs about ") and \
        "GiB of memory, but 16.0 GiB are free: make the image smaller (about " in text, text
    assert "passes to 1" in text and "close other programs and models" in text, text
    assert sizes == []


def test_encode_splits_by_the_reported_free_memory(pack, decoder_dir, monkeypatch):
    import comfy.sd
    from safetensors import safe_open

    prefix = "first_stage_model."
    with safe_open(str(synthetic_file("sd15_checkpoint")), framework="pt") as f:
        vae = comfy.sd.VAE(sd={k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)})
    image = torch.rand(3, 64, 64, 4)
    (whole,) = run_node(pack, "LayeredDiffusionEncode", vae=vae, image=image, sd_version="SD15")
    offsets = _spy(monkeypatch, pack_module("nodes.vae_pipeline"), "transparency_offset", argument=2)
    _report_free(monkeypatch, pack_module("lib_layerdiffuse.batch_memory").encoder_memory(64, 64, 4).for_images(2))
    (split,) = run_node(pack, "LayeredDiffusionEncode", vae=vae, image=image, sd_version="SD15")
    assert offsets == [2, 1]
    torch.testing.assert_close(split["samples"], whole["samples"], atol=1e-5, rtol=0)


def test_upscale_splits_by_the_reported_free_memory(pack, tmp_path, monkeypatch):
    import folder_paths
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    from comfy_extras.nodes_upscale_model import UpscaleModelLoader

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "upscale_models", ([str(tmp_path)], {".safetensors"}))
    torch.manual_seed(0)
    save_file(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=1, upscale=2).state_dict(),
              str(tmp_path / "compact.safetensors"))
    model = UpscaleModelLoader.execute("compact.safetensors").result[0]
    image = torch.rand(3, 32, 32, 4)

    def upscale(**kwargs):
        return run_node(pack, "LayeredDiffusionUpscaleRGBA", image=image, upscale_method="bilinear", scale_by=2.0,
                        width=0, height=0, crop="disabled", **kwargs)[0]

    whole = upscale(upscale_model=model)
    upscale_module = pack_module("nodes.upscale")
    runs = _spy(monkeypatch, upscale_module, "upscale_rgba_with_model")
    memory = pack_module("lib_layerdiffuse.batch_memory").resize_memory(64, 64, 3, 2.0, 32, 32)
    _report_free(monkeypatch, memory.for_images(1) + memory.per_image // 2)
    torch.testing.assert_close(upscale(upscale_model=model), whole)
    assert runs == [1, 1, 1]

    # An upscale to 16384x16384 holds 4 GiB of results per image: refused with 1 GiB free.
    _report_free(monkeypatch, GIB)
    with pytest.raises(pack_module("lib_layerdiffuse.errors").InputError,
                       match=r"^Layer Diffuse Upscale \(RGBA\): resizing 32x32 to 16384x16384 needs about .* GiB of "
                             r"memory with 2 images in the batch, but 1\.0 GiB are free: lower scale_by"):
        run_node(pack, "LayeredDiffusionUpscaleRGBA", image=torch.rand(2, 32, 32, 4), upscale_method="bilinear",
                 scale_by=1.0, width=16384, height=16384, crop="disabled")


def test_peak_memory_stays_within_the_reported_free_memory(comfyui_path):
    """Layer Diffuse Decode (RGBA) in a fresh ComfyUI process (benchmarks/bench_batch_memory.py), 3 x
    512x512 with room for 2: two sub-batches, and the process's peak grows by less than the free
    memory reported."""
    from lib_layerdiffuse.batch_memory import decoder_memory

    memory = decoder_memory(512, 512, 3, 4, 1, True)
    free = memory.for_images(2) + memory.per_image // 2
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "node", "--size", "512", "--batch", "3", "--passes", "1",
         "--report-free-gib", str(free / GIB), "--json"],
        env={**os.environ, "COMFYUI_PATH": str(comfyui_path)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sub_batches"] == [2, 1]
    assert 0.5 * free < result["growth"] <= free, (result["growth"] / GIB, free / GIB)
