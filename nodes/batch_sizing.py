"""How many images the transparent decode, the offset encoder and the RGBA upscale run at once: the
estimates of lib_layerdiffuse.batch_memory against the memory ComfyUI reports free on the device
(`model_management.get_free_memory`, which on the CPU is the system's available memory), as
ComfyUI's own VAE decode sizes its batches. Not even one image fitting is an error that says what
to lower, raised before the work allocates anything.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import comfy.model_management as model_management
from comfy.model_patcher import ModelPatcher

from ..lib_layerdiffuse.batch_memory import (
    decoder_cure,
    decoder_memory,
    encoder_memory,
    images_at_once,
    resize_memory,
)
from . import model_store


def free_memory(device: torch.device) -> int:
    return int(model_management.get_free_memory(device))


def load_decoder(patcher: ModelPatcher, shape: torch.Size, passes: int, sub_batch_size: int,
                 node: str) -> tuple[nn.Module, int]:
    """The transparent decoder in `patcher` loaded on its device with room for one image, and how many
    of the [B,3,H,W] images it decodes at once (at most `sub_batch_size`)."""
    batch, _, height, width = shape
    device = patcher.load_device
    dtype = patcher.model.compute_dtype
    on_cpu = torch.device(device).type == "cpu"
    memory = decoder_memory(height, width, batch, dtype.itemsize, passes, on_cpu)
    model = model_store.load_to_device(patcher, memory.for_images(1))
    free = free_memory(device)
    work = f"{node}: the transparent decoder ({width}x{height}, {str(dtype).removeprefix('torch.')}, {passes} passes)"
    cure = decoder_cure(height, width, batch, dtype.itemsize, passes, on_cpu, free)
    return model, images_at_once(memory, free, batch, sub_batch_size, work, cure)


def load_encoder(patcher: ModelPatcher, shape: torch.Size, node: str) -> tuple[nn.Module, int]:
    """The offset encoder in `patcher` loaded on its device with room for one image, and how many of
    the [B,3,H,W] images it encodes at once."""
    batch, _, height, width = shape
    memory = encoder_memory(height, width, patcher.model.blocks[0].weight.dtype.itemsize)
    model = model_store.load_to_device(patcher, memory.for_images(1))
    work = f"{node}: the transparent encoder ({width}x{height})"
    step = images_at_once(memory, free_memory(patcher.load_device), batch, batch, work,
                          "encode a smaller image, or close other programs and models to free memory")
    return model, step


def resize_batch(shape: torch.Size, size: tuple[int, int], node: str, model_scale: float | None = None) -> int:
    """How many of the [B,C,H,W] RGBA images are resized to `size` (height, width) at once (through an
    upscale model of `model_scale` when given) in the memory free for the results."""
    batch, _, height, width = shape
    memory = resize_memory(*size, batch, model_scale, height, width)
    work = f"{node}: resizing {width}x{height} to {size[1]}x{size[0]}"
    return images_at_once(memory, free_memory(model_management.intermediate_device()), batch, batch, work,
                          "lower scale_by, width or height, resize fewer images at once, or close other programs "
                          "and models to free memory")


def in_sub_batches(run: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], step: int,
                   *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """`run` on `step` images of the inputs at a time, its outputs (a tensor or a tuple) concatenated."""
    outputs = [run(*(x[start:start + step] for x in inputs)) for start in range(0, inputs[0].shape[0], step)]
    if len(outputs) == 1:
        return outputs[0]
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)
