"""What differs between the ComfyUI versions the pack supports (0.8.0 to 0.33.0), in one place.

Newer hosts add schema fields and types; the pack uses them where the running host has them and
leaves them out where it does not, so one code path serves every supported version.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

import comfy.model_management as model_management
from comfy_api.latest import io


def schema(**fields: Any) -> io.Schema:
    """io.Schema from the fields this host's Schema knows; fields of newer hosts (such as
    `search_aliases`, from 0.33) are dropped on older ones."""
    known = {field.name for field in dataclasses.fields(io.Schema)}
    return io.Schema(**{name: value for name, value in fields.items() if name in known})


def layers_type() -> Optional[type]:
    """The LAYERS type of core's layered images (Add Layer, Create Layered Image), or None on
    hosts that do not have it."""
    return getattr(io, "Layers", None)


def is_oom(error: Exception) -> bool:
    """Whether `error` is running out of device memory: core's own test where the host has one
    (`is_oom`, newer hosts), else its exception type."""
    host_is_oom = getattr(model_management, "is_oom", None)
    return host_is_oom(error) if host_is_oom else isinstance(error, model_management.OOM_EXCEPTION)


@contextmanager
def upscale_model_on_device(upscale_model, memory_required: int) -> Iterator[torch.device]:
    """An upscale model (core's UPSCALE_MODEL) on ComfyUI's device for the block, with room for
    `memory_required` bytes of work, placed as core's Upscale Image (using Model) places it on
    the running host: newer hosts' loader wraps it in a ModelPatcher that ComfyUI loads; older
    ones hand over the bare model, which moves there and back."""
    patcher = getattr(upscale_model, "patcher", None)
    if patcher is not None:
        model_management.load_models_gpu([patcher], memory_required=memory_required, force_full_load=True)
        yield patcher.load_device
        return
    device = model_management.get_torch_device()
    model_management.free_memory(memory_required + model_management.module_size(upscale_model.model), device)
    upscale_model.to(device)
    try:
        yield device
    finally:
        upscale_model.to(model_management.unet_offload_device())
