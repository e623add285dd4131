"""SD1.5 attention sharing on ComfyUI's UNet: the official sharing weights join each of the 32
attention modules through per-clone object patches.

Host internals used here: object patches on `diffusion_model.*` attention modules, ComfyUI's
`optimized_attention` (so core attention back-ends and patches keep applying), the sampler's
`transformer_options` (sigmas, cond/uncond rows), `model_sampling.percent_to_sigma`, and the model
size the memory planner counts (`ModelPatcher.size`, attachments).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management as model_management
from comfy.model_patcher import ModelPatcher

from ..lib_layerdiffuse import attention_sharing as sharing
from ..lib_layerdiffuse.errors import ModelError
from ..lib_layerdiffuse.weight_files import build_model, read_safetensors
from . import model_store
from .modes import Mode

UNET_PREFIX = "diffusion_model."
SHARING_BYTES = "layerdiffuse_sharing_bytes"


def _host_attention(q, k, v, heads, transformer_options):
    return comfy_attention.optimized_attention(q, k, v, heads, transformer_options=transformer_options)


def active_until(model: ModelPatcher, stop_at: float) -> Callable[[dict], bool]:
    """Whether a sampling step (its transformer options) still runs the mode.

    The SDXL modes stop through ComfyUI's hook keyframes, but hooks cannot carry object patches
    (the host does not support ObjectPatchHook), so the sharing units read the step's sigma and
    switch off where a keyframe at `stop_at` would: from the first step at or below its sigma.
    """
    if stop_at >= 1.0:
        return lambda transformer_options: True
    stop_sigma = float(model.get_model_object("model_sampling").percent_to_sigma(stop_at))

    def active(transformer_options: dict) -> bool:
        sigmas = transformer_options.get("sigmas")
        return sigmas is None or float(sigmas[0]) > stop_sigma
    return active


def apply_attention_sharing(model: ModelPatcher, mode: Mode, strength: float = 1.0, stop_at: float = 1.0,
                            overwrites: Sequence[Optional[torch.Tensor]] = (),
                            control_image: Optional[torch.Tensor] = None) -> ModelPatcher:
    """A clone of an SD1.5 `model` whose attention modules share attention across the frames of
    each image. `overwrites[f]`: a text context for frame f's cond rows (or None); `control_image`
    [B,H,W,3]: the given layer of the modes that take one."""
    if mode.control and control_image is None:
        raise ModelError(f"'{mode.config}' needs the image of the given layer")
    path = model_store.ensure_weight_file(mode.weight_file)
    work = model.clone()
    keys = [UNET_PREFIX + name for name in sharing.SD15_ATTENTION_MODULES]
    originals = []
    for key in keys:
        module = work.get_model_object(key)
        originals.append(module.original if isinstance(module, sharing.SharedAttention) else module)

    def factory():
        return sharing.build_attention_sharing(sharing.shapes_of(originals), mode.frames, mode.control)

    weights = build_model(factory, read_safetensors(path), mode.file,
                          device=model_management.unet_offload_device(), dtype=torch.float32)
    state = sharing.SharingState(
        frames=mode.frames, strength=float(strength), attention=_host_attention,
        active=active_until(work, stop_at), overwrites=list(overwrites),
        control=weights.encode_control(control_image) if mode.control else None,
        label=f"LayerDiffuse '{mode.config}'",
    )
    unet_dtype = work.model.manual_cast_dtype or work.model.get_dtype()
    for key, module in zip(keys, sharing.shared_attention_modules(originals, weights, state, dtype=unet_dtype)):
        work.add_object_patch(key, module)
    # The units join the UNet when ComfyUI loads it: count them in the size it plans memory with,
    # replacing what an earlier sharing patch on this clone added.
    extra = model_management.module_size(weights)
    work.size = model.model_size() - (model.get_attachment(SHARING_BYTES) or 0) + extra
    work.set_attachments(SHARING_BYTES, extra)
    return work
