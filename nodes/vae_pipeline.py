"""What the SD1.5/SDXL and the Flux transparent VAE nodes share: the decoder's speed inputs, the
decode pipeline (latent + its VAE-decoded pixels -> RGBA) with the decoder's run under ComfyUI's
memory management, the VAE batching loop, the VAE posterior, and the encode pipeline (RGBA image
-> latent that carries its alpha). The nodes give the family record and where the pixels come from.

Host internals used here: `comfy.model_management` (loading models, free memory, interruption),
`comfy.utils.ProgressBar`, and a VAE's `first_stage_model` encoder/decoder, whose posterior std
and unclamped output ComfyUI's own `VAE.encode` / `VAE.decode` do not give.
"""
from __future__ import annotations

from typing import Callable

import torch

import comfy.model_management as model_management
import comfy.utils
from comfy.model_patcher import ModelPatcher
from comfy.sd import VAE
from comfy_api.latest import io

from ..lib_layerdiffuse import rgba
from ..lib_layerdiffuse.errors import InputError, ModelError
from ..lib_layerdiffuse.finite import VAE_CURE, require_finite
from ..lib_layerdiffuse.transparent_vae import (
    check_latent,
    check_pixels,
    decode_transparent,
    latent_with_offset,
    posterior_mean_std,
    sub_batches,
    transparency_offset,
)
from ..lib_layerdiffuse.vae_family import TransparentVAEFamily
from . import batch_sizing
from .rgba_io import split_rgba

PASSES = {"8": 8, "4": 4, "1": 1}
PRECISIONS = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIZE_MULTIPLE = 8


def sub_batch_input() -> io.Int.Input:
    return io.Int.Input(
        "sub_batch_size", default=16, min=1, max=4096, step=1,
        tooltip="How many images go through the decoder at once. Lower it if you run out of memory.",
    )


def speed_inputs() -> list[io.Input]:
    """Inputs added after the peer pack's ones and optional, so that its saved workflows, UI and
    API format alike, keep their values and still validate."""
    return [
        io.Combo.Input(
            "passes", options=list(PASSES), default="8", optional=True,
            tooltip="Decoder passes merged by a per-pixel median. 8 (flips x rotations) is the reference "
                    "quality; 4 (no quarter turns) takes half the time; 1 is a quick preview. See the README "
                    "for measured differences.",
        ),
        io.Combo.Input(
            "precision", options=list(PRECISIONS), default="auto", optional=True,
            tooltip="auto: float16 on GPUs that support it, float32 on the CPU (reference results). "
                    "bfloat16: the network in bfloat16, about 2-2.5x faster than float32 on CPUs with "
                    "AVX-512 BF16/AMX, max difference about 3e-2 from float32. float16: for GPUs (slower than "
                    "float32 on most CPUs).",
        ),
    ]


def decode_rgba(family: TransparentVAEFamily, node: str, latent: torch.Tensor,
                pixels_for: Callable[[torch.Tensor], torch.Tensor],
                load_decoder: Callable[[torch.dtype | None], ModelPatcher],
                sub_batch_size: int, passes: str, precision: str) -> torch.Tensor:
    """RGBA IMAGE [B,H,W,4] (alpha last, 1 = opaque) of a latent batch: its pixels [B,3,H,W] are
    `pixels_for(latent)`, the decoder is `load_decoder(dtype)` (dtype None: ComfyUI's choice)."""
    check_latent(family, latent, node)
    pixel = pixels_for(latent)
    check_pixels(pixel, latent, node)
    patcher = load_decoder(PRECISIONS[precision])
    return run_transparent_decoder(family, node, patcher, pixel, latent, sub_batch_size, passes).movedim(1, -1)


def run_transparent_decoder(family: TransparentVAEFamily, node: str, patcher: ModelPatcher, pixel: torch.Tensor,
                            latent: torch.Tensor, sub_batch_size: int, passes: str) -> torch.Tensor:
    """The augmented decode of [B,3,H,W] pixels and their latents with the decoder in `patcher`,
    on ComfyUI's device after making room, with a progress bar and interruption.
    Returns R,G,B,A [B,4,H,W] float32 on the CPU."""
    model, step = batch_sizing.load_decoder(patcher, pixel.shape, PASSES[passes], sub_batch_size, node)
    bar = comfy.utils.ProgressBar(PASSES[passes] * sub_batches(pixel.shape[0], step))

    def on_pass() -> None:
        model_management.throw_exception_if_processing_interrupted()
        bar.update(1)

    return decode_transparent(family, model, pixel.cpu(), latent.cpu().float(), step, on_pass, PASSES[passes])


def vae_batches(vae: VAE, inputs: torch.Tensor, memory_per_item: int, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`run` over `inputs` in batches as large as the free memory allows once the VAE is loaded
    (ComfyUI's own VAE.encode/decode batching), each batch moved to the VAE's device and dtype;
    the results concatenated on the VAE's output device."""
    model_management.load_models_gpu([vae.patcher], memory_required=memory_per_item, force_full_load=vae.disable_offload)
    step = max(1, int(model_management.get_free_memory(vae.device) / max(1, memory_per_item)))
    outputs = [run(inputs[start:start + step].to(vae.vae_dtype).to(vae.device)).to(vae.output_device)
               for start in range(0, inputs.shape[0], step)]
    return torch.cat(outputs)


def vae_posterior(vae: VAE, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for [B,3,H,W] pixels in [0,1] (VAE.encode gives only the mean)."""
    autoencoder = vae.first_stage_model
    regularizer = type(getattr(autoencoder, "regularization", None)).__name__
    if regularizer != "DiagonalGaussianRegularizer" or getattr(autoencoder, "bn", None) is not None:
        raise ModelError("transparent encoding needs a Stable Diffusion or Flux (KL) VAE; this VAE has no Gaussian "
                         "posterior")

    def moments(x: torch.Tensor) -> torch.Tensor:
        out = autoencoder.encoder(x)
        if getattr(autoencoder, "quant_conv", None) is not None:
            out = autoencoder.quant_conv(out)
        return out.float()

    memory = vae.memory_used_encode(pixels.shape, vae.vae_dtype)
    return posterior_mean_std(vae_batches(vae, vae.process_input(pixels), memory, moments))


def decode_unclamped(vae: VAE, latent: torch.Tensor) -> torch.Tensor:
    """VAE-decoded pixels [B,3,H,W] in about [0,1] but not clamped (VAE.decode clamps; the Flux
    transparent decoder was trained on the unclamped values)."""
    vae.throw_exception_if_invalid()
    memory = vae.memory_used_decode(latent.shape, vae.vae_dtype)
    return vae_batches(vae, latent, memory, lambda z: vae.first_stage_model.decode(z).float() * 0.5 + 0.5)


def crop_to_multiple_of_8(x: torch.Tensor) -> torch.Tensor:
    """Centre-crop [B,C,H,W] to multiples of 8, as ComfyUI's VAE Encode does."""
    h, w = x.shape[-2:]
    top, left = (h % SIZE_MULTIPLE) // 2, (w % SIZE_MULTIPLE) // 2
    return x[..., top : top + h - h % SIZE_MULTIPLE, left : left + w - w % SIZE_MULTIPLE]


def encode_transparent(family: TransparentVAEFamily, node: str, vae: VAE, image: torch.Tensor,
                       mask: torch.Tensor | None, encoder: ModelPatcher) -> torch.Tensor:
    """The latent [B,C,H/8,W/8] that carries an RGBA image's alpha: the VAE posterior mean of the
    image flattened on the family's grey, moved by the offset encoder's output in posterior std units."""
    rgb, alpha = (crop_to_multiple_of_8(x) for x in split_rgba(image, mask, node))
    if min(rgb.shape[-2:]) < SIZE_MULTIPLE:
        raise InputError(f"{node}: the image is {image.shape[2]}x{image.shape[1]}; it must be at least 8x8: "
                         "upscale it first (e.g. Layer Diffuse Upscale (RGBA))")
    network, step = batch_sizing.load_encoder(encoder, rgb.shape, node)
    moved = batch_sizing.in_sub_batches(lambda c, a: transparency_offset(family, network, c, a), step, rgb, alpha)
    mean, std = vae_posterior(vae, rgba.flatten_on_grey(rgb, alpha, family.grey))
    latent = latent_with_offset(mean, std, moved)
    require_finite(latent, node, "the encoded latent", VAE_CURE)
    return latent
