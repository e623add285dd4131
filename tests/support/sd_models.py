"""Shared pieces of the generation-mode tests: synthetic SD1.5/SDXL models in the real host, the
SD1.5 goldens' modes and the exact sampling call they record."""
from __future__ import annotations

import ctypes
import gc
import math
import sys

import torch

from .layer_files import layer_model_files
from .synth import meta_state, synthetic_file

# golden stem -> (apply-module mode list, config string, layer manifest, layer seed)
SD15_GOLDENS = {
    "sd15_transparent_attn_seed0": ("APPLY_MODES", "SD15, Attention Injection, attn_sharing", "layer_sd15_transparent_attn", 0),
    "sd15_joint_seed0": ("JOINT_MODES", "SD15, attn_sharing, Batch size (3N)", "layer_sd15_joint", 0),
    "sd15_fg2bg_seed0": ("COND_JOINT_MODES", "SD15, Foreground, attn_sharing, Batch size (2N)", "layer_sd15_fg2bg", 0),
    "sd15_bg2fg_seed0": ("COND_JOINT_MODES", "SD15, Background, attn_sharing, Batch size (2N)", "layer_sd15_bg2fg", 1),
}


def release_models() -> None:
    """Drop ComfyUI's references to loaded models so a module's large models can be freed, and give
    the freed memory back to the system: the servers that later tests start need it."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.cleanup_models_gc()
    gc.collect()
    return_freed_memory()


def return_freed_memory() -> None:
    """glibc keeps freed heap memory (a checkpoint's many small tensors) in this process until
    asked; without this the test process holds gigabytes that no longer hold anything."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def load_sd15_model(path, dtype: torch.dtype = torch.float32):
    """The MODEL of an SD1.5 checkpoint file on the CPU, its UNet weights in `dtype` (float32: as
    the goldens load it)."""
    import comfy.sd

    options = {} if dtype == torch.float32 else {"dtype": dtype}
    model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False,
                                                  output_clipvision=False, model_options=options)[0]
    assert model.model.get_dtype() == dtype
    return model


def one_eval(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """The goldens' sampler: a single model evaluation at sigmas[0]."""
    return model(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args)


def _guider(model, tensors, cond, uncond):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(cond if cond is not None else [[tensors["input.cond_context"], {}]],
                     uncond if uncond is not None else [[tensors["input.uncond_context"], {}]])
    guider.set_cfg(float(tensors["input.cfg"][0]))
    return guider


def sample_once(model, tensors: dict[str, torch.Tensor], noise=None, cond=None, uncond=None) -> torch.Tensor:
    """The goldens' call: CFGGuider(model).sample with one evaluation; returns `final`."""
    import comfy.samplers

    noise = tensors["input.noise"] if noise is None else noise
    guider = _guider(model, tensors, cond, uncond)
    sigma = float(tensors["input.sigma"][0])
    return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(one_eval),
                         torch.tensor([sigma, 0.0]), disable_pbar=True, seed=0)


def replay_apply_model(model, tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """The goldens' single `apply_model` call (batch [uncond x B, cond x B]) on a loaded model."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    x = tensors[f"{prefix}.apply_model.0.input_x"]
    timestep = tensors[f"{prefix}.apply_model.0.timestep"]
    batch = x.shape[0] // 2
    context = torch.cat([tensors["input.uncond_context"]] * batch + [tensors["input.cond_context"]] * batch)
    options = {"cond_or_uncond": [1, 0], "sigmas": timestep[:batch]}
    with torch.no_grad():
        return model.model.apply_model(x, timestep, c_crossattn=context, transformer_options=options)


def golden_patch(stem: str, model, tensors, **overrides):
    """The node-level patch each golden records, applied with our code and the synthetic layer file."""
    from .pack import pack_module

    modes = pack_module("nodes.modes")
    modes_name, config, manifest, seed = SD15_GOLDENS[stem]
    mode = modes.find_mode(getattr(modes, modes_name), config)
    overwrites = [tensors[f"input.overwrite_context_{i}"] for i in range(mode.frames)] if mode.frames > 1 else []
    control = tensors.get("input.control_image") if mode.control else None
    kwargs = dict(overwrites=overwrites, control_image=control)
    kwargs.update(overrides)
    with layer_model_files(synthetic_file(manifest, seed=seed)):
        return pack_module("nodes.sd15_sharing").apply_attention_sharing(model, mode, **kwargs)


def sample_evals(model, tensors: dict[str, torch.Tensor], sigmas: list[float], cond=None, uncond=None) -> list[torch.Tensor]:
    """Like `sample_once`, but the sampler evaluates the model at each of `sigmas` in turn (same
    x) and returns every CFG-combined x0 prediction: a sampling run that crosses a stop-at."""
    import comfy.samplers

    record = []

    def evals(model_fn, x, _sigmas, extra_args=None, callback=None, disable=None):
        for sigma in sigmas:
            record.append(model_fn(x, sigma * x.new_ones([x.shape[0]]), **extra_args))
        return record[-1]

    noise = tensors["input.noise"]
    _guider(model, tensors, cond, uncond).sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(evals),
                  torch.tensor([sigmas[0], 0.0]), disable_pbar=True, seed=0)
    return record


def percent_between(model, high_sigma: float, low_sigma: float) -> float:
    """A stop-at percent whose sigma lies strictly between two sigmas."""
    sampling = model.get_model_object("model_sampling")
    for p in range(1, 100):
        if low_sigma < sampling.percent_to_sigma(p / 100) < high_sigma:
            return p / 100
    raise AssertionError(f"no percent between sigma {high_sigma} and {low_sigma}")


def sdxl_model(dtype: torch.dtype, meta: bool):
    """ComfyUI's SDXL model (detected from the SDXL checkpoint layout) in a ModelPatcher on the CPU:
    on the meta device (nothing allocated), or allocated with deterministic random weights."""
    import comfy.model_detection
    import comfy.model_patcher

    prefix = "model.diffusion_model."
    state = {k: v for k, v in meta_state("sdxl_checkpoint").items() if k.startswith(prefix)}
    config = comfy.model_detection.model_config_from_unet(state, prefix)
    config.set_inference_dtype(dtype, None)
    with torch.device("meta" if meta else "cpu"):
        model = config.get_model(state, "model.")
    if not meta:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.diffusion_model.named_parameters():
                if p.ndim >= 2:
                    p.normal_(0, 1 / math.sqrt(p[0].numel()), generator=gen)
                else:
                    p.fill_(1.0) if name.endswith("weight") else p.zero_()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
