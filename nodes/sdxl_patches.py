"""SDXL LayerDiffuse modes on ComfyUI's UNet: the patch files as ComfyUI weight patches, the given
layers as concat conditioning, and stop_at as a weight hook whose keyframes end it.

Host internals used here: ComfyUI's LoRA loading (through lora_fit, and the weight hooks of
`comfy.hooks`, which load the same generic format), fed the patch files in the generic LoRA/diff
format; a `pad_weight` diff patch for the widened input convolution; hook keyframes;
`model_conds["c_concat"]` on conditioning entries; for stop_at, an OUTER_SAMPLE wrapper that gives
the hook to the sampler's prompts and registers it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

import comfy.conds
import comfy.hooks
import comfy.patcher_extension
import comfy.sampler_helpers
from comfy.model_patcher import ModelPatcher

from ..lib_layerdiffuse import patch_files
from ..lib_layerdiffuse.errors import ModelError
from ..lib_layerdiffuse.weight_files import read_safetensors
from . import lora_fit, model_store
from .modes import Mode

UNET_PREFIX = "diffusion_model."
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
WRAPPER_KEY = "layerdiffuse_stop_at"

Conditioning = list  # ComfyUI's CONDITIONING: [[tensor, options], ...]


def load_patches(model: ModelPatcher, mode: Mode) -> list[patch_files.WeightPatch]:
    """The mode's patch file, parsed and checked against the model's weights."""
    path = model_store.ensure_weight_file(mode.weight_file)
    patches = patch_files.parse_patch_file(read_safetensors(path), mode.file)
    patch_files.check_against_model(patches, declared_shapes(model), mode.file)
    return patches


def declared_shapes(model: ModelPatcher) -> dict[str, tuple]:
    """Each UNet weight's shape as its module declares it. The live tensor can be wider: weight
    patches are applied to the one shared model, so while another clone of it is loaded its
    padded input conv is what `state_dict()` shows."""
    shapes = {}
    for key, tensor in model.model_state_dict().items():
        module_name, _, attr = key.rpartition(".")
        module = model.get_model_object(module_name) if module_name else None
        if attr == "weight" and isinstance(module, torch.nn.Conv2d):
            shapes[key] = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        elif attr == "weight" and isinstance(module, torch.nn.Linear):
            shapes[key] = (module.out_features, module.in_features)
        else:
            shapes[key] = tuple(tensor.shape)
    return shapes


def generic_lora(patches: Sequence[patch_files.WeightPatch]) -> dict[str, torch.Tensor]:
    """The patches in ComfyUI's generic LoRA format: `<module>.lora_up.weight`, `.lora_down.weight`
    and `.alpha` for LoRAs, `<module>.diff` for weight offsets, `<key>.diff` for other tensors."""
    lora = {}
    for p in patches:
        name = p.key.removesuffix(".weight")
        if p.kind == patch_files.LORA:
            lora[f"{name}.lora_up.weight"] = p.up
            lora[f"{name}.lora_down.weight"] = p.down
            if p.alpha is not None:
                lora[f"{name}.alpha"] = torch.tensor(p.alpha)
        else:
            lora[f"{name}.diff"] = p.diff
    return lora


def _widening(model: ModelPatcher, patches: Sequence[patch_files.WeightPatch]) -> Optional[patch_files.WeightPatch]:
    """The patch that widens the input conv (the layer-conditioning files take 8 or 12 channels),
    if any. No other weight may change shape."""
    shapes = declared_shapes(model)
    wide = [p for p in patches if p.key in shapes and p.pads(shapes[p.key])]  # a key not there: lora_fit says so
    for p in wide:
        if p.key != CONV_IN_KEY:
            raise ModelError(f"only the input conv can be widened; {p.key} is {list(shapes[p.key])}")
    return wide[0] if wide else None


def _pad_input_conv(model: ModelPatcher, diff: torch.Tensor, strength: float) -> None:
    """Widen the input conv of `model` (a clone) to the patch's channel count, adding `diff`: the
    given layers' channels start from the file's weights alone."""
    model.add_patches({CONV_IN_KEY: ("diff", (diff, {"pad_weight": True}))}, strength)


def apply_weight_patches(model: ModelPatcher, patches: Sequence[patch_files.WeightPatch], strength: float,
                         file_name: str) -> ModelPatcher:
    """A clone of `model` with the patches at `strength`, through ComfyUI's own LoRA loading."""
    wide = _widening(model, patches)
    same_shape = [p for p in patches if p is not wide]
    work = lora_fit.apply_lora(model, generic_lora(same_shape), strength, file_name,
                               "Use the official file for this config, on an SDXL model.")
    if wide is not None:
        _pad_input_conv(work, wide.diff, strength)
    return work


def stop_hooks(model: ModelPatcher, patches: Sequence[patch_files.WeightPatch], strength: float,
               stop_at: float) -> tuple[ModelPatcher, comfy.hooks.HookGroup]:
    """(clone of `model`, hooks) for patches that act until stop_at: a weight hook with the
    patches at `strength`, whose keyframes drop it to 0 at stop_at, for the sampler's prompts.
    Hooked weights are swapped in place, so they cannot change shape: the clone's input conv is
    widened with zeros for good, and the hook adds the file's input conv to it until stop_at
    (after it the extra channels weigh nothing, whatever the prompt still feeds them)."""
    wide = _widening(model, patches)
    work = model.clone()
    if wide is not None:
        _pad_input_conv(work, torch.zeros_like(wide.diff), 1.0)
    hooks = comfy.hooks.create_hook_lora(generic_lora(patches), strength_model=strength, strength_clip=0.0)
    keyframes = comfy.hooks.HookKeyframeGroup()
    keyframes.add(comfy.hooks.HookKeyframe(strength=1.0, start_percent=0.0))
    keyframes.add(comfy.hooks.HookKeyframe(strength=0.0, start_percent=stop_at))
    hooks.set_keyframes_on_hooks(keyframes)
    return work, hooks


def apply_weight_patches_until(model: ModelPatcher, patches: Sequence[patch_files.WeightPatch], strength: float,
                               stop_at: float) -> ModelPatcher:
    """A clone of `model` whose patches act until stop_at: an OUTER_SAMPLE wrapper adds the hook
    to every prompt the sampler was handed and registers it, as ComfyUI registers the hooks
    prompts bring.

    Every SDXL mode stops this way, also those that return prompts (which could carry the hook
    themselves): the Apply node returns only a model, so the hook has to come with the model, and
    one mechanism keeps stop_at behaving the same in every node."""
    work, hooks = stop_hooks(model, patches, strength, stop_at)

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        cache = {}
        guider.conds = {name: [comfy.hooks.set_hooks_for_conditioning([[None, entry]], hooks, cache=cache)[0][1]
                               for entry in entries]
                        for name, entries in guider.conds.items()}
        _register_weight_hooks(guider)
        return executor(*args, **kwargs)

    work.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)
    return work


def _register_weight_hooks(guider) -> None:
    """Register the weight hooks now on the guider's prompts. ComfyUI registered those the prompts
    came with before this wrapper ran; registering all of them again adds ours beside them."""
    hooks = comfy.hooks.HookGroup()
    for entries in guider.conds.values():
        comfy.sampler_helpers.get_hooks_from_cond(entries, hooks)
    registered = guider.model_options.get("registered_hooks") or comfy.hooks.HookGroup()
    target = comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model)
    guider.model_options["registered_hooks"] = guider.model_patcher.register_all_hook_patches(
        hooks, target, guider.model_options, registered)


def with_concat(conditioning: Conditioning, c_concat: torch.Tensor) -> Conditioning:
    """A copy of `conditioning` whose entries feed `c_concat` to the model."""
    out = []
    for tensor, options in conditioning:
        model_conds = {**options.get("model_conds", {}), "c_concat": comfy.conds.CONDRegular(c_concat)}
        out.append([tensor, {**options, "model_conds": model_conds}])
    return out


def apply_mode_patches(model: ModelPatcher, mode: Mode, patches: Sequence[patch_files.WeightPatch],
                       strength: float, stop_at: float) -> ModelPatcher:
    """A clone of `model` with the mode's patches, until stop_at where it is below 1."""
    if stop_at < 1.0:
        return apply_weight_patches_until(model, patches, strength, stop_at)
    return apply_weight_patches(model, patches, strength, mode.file)


def apply_concat_mode(model: ModelPatcher, mode: Mode, cond: Conditioning, uncond: Conditioning,
                      latents: Sequence[dict], strength: float,
                      stop_at: float = 1.0) -> tuple[ModelPatcher, Conditioning, Conditioning]:
    """(model, cond, uncond) for the SDXL layer-conditioning modes: weight patches plus the given
    latents (in the model's latent space) as concat conditioning on cond and uncond."""
    patches = load_patches(model, mode)
    channels = patch_files.input_channels(patches, CONV_IN_KEY)
    c_concat = model.model.latent_format.process_in(torch.cat([latent["samples"] for latent in latents], dim=1))
    base_channels = model.model.diffusion_model.input_blocks[0][0].in_channels
    if channels is not None and channels != base_channels + c_concat.shape[1]:
        raise ModelError(f"{mode.file} expects {channels - base_channels} concat channels, got {c_concat.shape[1]}")
    work = apply_mode_patches(model, mode, patches, strength, stop_at)
    return work, with_concat(cond, c_concat), with_concat(uncond, c_concat)
