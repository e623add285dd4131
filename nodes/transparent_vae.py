"""Transparent VAE nodes: decode a latent to RGBA, encode RGBA to a latent, preview RGBA.

Node ids, input names/order, combo strings and outputs of the decode nodes are those of
huchenlei/ComfyUI-layerdiffuse, so workflows saved with that pack open and run unchanged.
"""
from __future__ import annotations

import torch

import comfy.model_management as model_management
import comfy.utils
from comfy_api.latest import io

from ..lib_layerdiffuse import rgba
from ..lib_layerdiffuse.offset_encoder import LatentTransparencyOffsetEncoder
from ..lib_layerdiffuse.transparent_vae import (
    check_decode_inputs,
    decode_transparent,
    latent_with_offset,
    posterior_mean_std,
    sub_batches,
    transparency_offset,
)
from ..lib_layerdiffuse.unet1024 import UNet1024
from ..lib_layerdiffuse.weight_files import SD15, SDXL, TRANSPARENT_DECODERS, TRANSPARENT_ENCODERS
from ..lib_layerdiffuse.errors import InputError, ModelError
from . import model_store
from .rgba_io import alpha_for, rgba_image_inputs

CATEGORY = "layer_diffuse"
SD_LATENT_CHANNELS = 4
MAX_FRAMES = 3
# Rough working memory of one decoder pass per pixel at float32 (skip tensors, concats, the 8
# stacked outputs); ComfyUI frees this much before the decode starts.
DECODE_BYTES_PER_PIXEL = 2400


def _sd_version_input() -> io.Combo.Input:
    return io.Combo.Input(
        "sd_version", options=[SD15, SDXL], default=SDXL,
        tooltip="Which transparent VAE weights to use: SD15 for SD1.5 models, SDXL for SDXL models.",
    )


def sub_batch_input() -> io.Int.Input:
    return io.Int.Input(
        "sub_batch_size", default=16, min=1, max=4096, step=1,
        tooltip="How many images go through the decoder at once. Lower it if you run out of memory.",
    )


PASSES = {"8": 8, "4": 4, "1": 1}
PRECISIONS = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
                    "bfloat16: the network in bfloat16, about 2.5-3x faster than float32 on CPUs with "
                    "AVX-512 BF16/AMX, max difference about 3e-2 from float32. float16: for GPUs (slower than "
                    "float32 on most CPUs).",
        ),
    ]


def _samples_input() -> io.Latent.Input:
    return io.Latent.Input("samples", tooltip="The latents that were decoded into `images` (e.g. KSampler's output).")


def _images_input() -> io.Image.Input:
    return io.Image.Input("images", tooltip="VAE Decode's output for the same latents.")


def decoder_weights_dtype(precision: str) -> torch.dtype | None:
    """The network's dtype for a `precision` setting; None for auto: ComfyUI's choice for the device."""
    return PRECISIONS[precision]


def run_transparent_decoder(patcher, pixel: torch.Tensor, latent: torch.Tensor, sub_batch_size: int,
                            passes: str) -> torch.Tensor:
    """The augmented decode of [B,3,H,W] pixels and their latents with the decoder in `patcher`,
    on ComfyUI's device after making room, with a progress bar and interruption.
    Returns [B,4,H,W] float32 on the CPU, channels in the weight file's order."""
    step = min(sub_batch_size, pixel.shape[0])
    dtype_bytes = torch.finfo(patcher.model.compute_dtype).bits // 8
    working = step * pixel.shape[-2] * pixel.shape[-1] * DECODE_BYTES_PER_PIXEL * dtype_bytes // 4
    model = model_store.load_to_device(patcher, working)
    bar = comfy.utils.ProgressBar(PASSES[passes] * sub_batches(pixel.shape[0], sub_batch_size))

    def on_pass() -> None:
        model_management.throw_exception_if_processing_interrupted()
        bar.update(1)

    return decode_transparent(model, pixel.cpu(), latent.cpu().float(), sub_batch_size, on_pass, PASSES[passes])


def decode_rgba(samples: dict, images: torch.Tensor, sd_version: str, sub_batch_size: int,
                passes: str = "8", precision: str = "auto") -> torch.Tensor:
    """[B,H,W,4] RGBA (alpha last, 1 = opaque) for ComfyUI latents and their decoded images."""
    latent = samples["samples"]
    pixel = images[..., :3].movedim(-1, 1)
    check_decode_inputs(pixel, latent, SD_LATENT_CHANNELS)
    path = model_store.weight_path(TRANSPARENT_DECODERS[sd_version])
    patcher = model_store.network(path, UNet1024, decoder_weights_dtype(precision))
    alpha_rgb = run_transparent_decoder(patcher, pixel, latent, sub_batch_size, passes)
    return torch.cat([alpha_rgb[:, 1:], alpha_rgb[:, :1]], dim=1).movedim(1, -1)


class LayeredDiffusionDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionDecode",
            display_name="Layer Diffuse Decode",
            category=CATEGORY,
            description="Recover the transparent image from a LayerDiffuse latent and its VAE-decoded image.",
            inputs=[_samples_input(), _images_input(), _sd_version_input(), sub_batch_input(), *speed_inputs()],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The foreground colours (RGB)."),
                io.Mask.Output(display_name="MASK", tooltip="The predicted alpha: 1 = opaque, 0 = transparent "
                               "(the opposite of LoadImage's mask; invert it to use it as one)."),
            ],
        )

    @classmethod
    def execute(cls, samples, images, sd_version, sub_batch_size, passes="8", precision="auto") -> io.NodeOutput:
        image = decode_rgba(samples, images, sd_version, sub_batch_size, passes, precision)
        return io.NodeOutput(image[..., :3], image[..., 3])


class LayeredDiffusionDecodeRGBA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionDecodeRGBA",
            display_name="Layer Diffuse Decode (RGBA)",
            category=CATEGORY,
            description="Recover the transparent image as one RGBA image; Save Image writes it as a PNG with alpha.",
            inputs=[_samples_input(), _images_input(), _sd_version_input(), sub_batch_input(), *speed_inputs()],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="RGBA image (4 channels, alpha last).")],
        )

    @classmethod
    def execute(cls, samples, images, sd_version, sub_batch_size, passes="8", precision="auto") -> io.NodeOutput:
        return io.NodeOutput(decode_rgba(samples, images, sd_version, sub_batch_size, passes, precision))


class LayeredDiffusionDecodeSplit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionDecodeSplit",
            display_name="Layer Diffuse Decode (Split)",
            category=CATEGORY,
            description="Split a joint batch (fg, bg[, blended] per image) into its layers; the first layer is "
                        "decoded to RGBA, the others pass through.",
            inputs=[
                _samples_input(),
                _images_input(),
                io.Int.Input("frames", default=2, min=2, max=MAX_FRAMES, step=1,
                             tooltip="Images per group in the batch: 2 for fg/bg + blended modes, 3 for the joint mode."),
                _sd_version_input(),
                sub_batch_input(),
                *speed_inputs(),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="Layer 1 of every group, decoded to RGBA."),
                io.Image.Output(display_name="IMAGE", tooltip="Layer 2 of every group."),
                io.Image.Output(display_name="IMAGE", tooltip="Layer 3 of every group (frames = 3 only)."),
            ],
        )

    @classmethod
    def execute(cls, samples, images, frames, sd_version, sub_batch_size, passes="8", precision="auto") -> io.NodeOutput:
        if images.shape[0] % frames:
            raise InputError(
                f"Layer Diffuse Decode (Split): the batch has {images.shape[0]} images, not a multiple of frames={frames}; "
                "set frames to the number of layers the model generated per image"
            )
        first = decode_rgba({**samples, "samples": samples["samples"][::frames]}, images[::frames], sd_version,
                            sub_batch_size, passes, precision)
        layers = [first] + [images[i::frames] for i in range(1, frames)]
        return io.NodeOutput(*layers, *([None] * (MAX_FRAMES - frames)))


def crop_to_multiple_of_8(x: torch.Tensor) -> torch.Tensor:
    """Centre-crop [B,C,H,W] to multiples of 8, as ComfyUI's VAE Encode does."""
    h, w = x.shape[-2:]
    top, left = (h % 8) // 2, (w % 8) // 2
    return x[..., top : top + h - h % 8, left : left + w - w % 8]


def vae_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for [B,3,H,W] pixels in [0,1], with ComfyUI's memory
    handling (ComfyUI's own VAE.encode returns only the mean)."""
    autoencoder = vae.first_stage_model
    regularizer = type(getattr(autoencoder, "regularization", None)).__name__
    if regularizer != "DiagonalGaussianRegularizer" or getattr(autoencoder, "bn", None) is not None:
        raise ModelError("Layer Diffuse Encode needs a Stable Diffusion (KL) VAE; this VAE has no Gaussian posterior")
    memory = vae.memory_used_encode(pixels.shape, vae.vae_dtype)
    model_management.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=vae.disable_offload)
    step = max(1, int(model_management.get_free_memory(vae.device) / max(1, memory)))
    means, stds = [], []
    for start in range(0, pixels.shape[0], step):
        x = vae.process_input(pixels[start : start + step]).to(vae.vae_dtype).to(vae.device)
        moments = autoencoder.encoder(x)
        if getattr(autoencoder, "quant_conv", None) is not None:
            moments = autoencoder.quant_conv(moments)
        mean, std = posterior_mean_std(moments.float())
        means.append(mean.to(vae.output_device))
        stds.append(std.to(vae.output_device))
    return torch.cat(means), torch.cat(stds)


class LayeredDiffusionEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionEncode",
            display_name="Layer Diffuse Encode (RGBA)",
            category=CATEGORY,
            description="Encode a transparent image into a latent that carries its alpha, for transparent img2img "
                        "(KSampler with denoise < 1, then Layer Diffuse Decode).",
            inputs=[
                io.Vae.Input("vae", tooltip="The checkpoint's VAE."),
                *rgba_image_inputs(),
                _sd_version_input(),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The transparent latent.")],
        )

    @classmethod
    def execute(cls, vae, image, sd_version, mask=None) -> io.NodeOutput:
        if vae.latent_channels != SD_LATENT_CHANNELS:
            raise ModelError(f"Layer Diffuse Encode: this VAE makes {vae.latent_channels}-channel latents; "
                             f"the {sd_version} transparent encoder is for the 4-channel SD1.5/SDXL VAE")
        alpha = crop_to_multiple_of_8(alpha_for(image, mask, "Layer Diffuse Encode"))
        rgb = crop_to_multiple_of_8(image[..., :3].movedim(-1, 1).float())
        if min(rgb.shape[-2:]) < 8:
            raise InputError(f"Layer Diffuse Encode: the image is {image.shape[2]}x{image.shape[1]}; it must be at least 8x8")
        patcher = model_store.network(model_store.weight_path(TRANSPARENT_ENCODERS[sd_version]),
                                      LatentTransparencyOffsetEncoder)
        encoder = model_store.load_to_device(patcher, rgb.numel() * 64)
        offset = transparency_offset(encoder, rgb, alpha)
        mean, std = vae_posterior(vae, rgba.flatten_on_grey(rgb, alpha))
        return io.NodeOutput({"samples": latent_with_offset(mean, std, offset)})


class LayeredDiffusionCheckerboard(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionCheckerboard",
            display_name="Layer Diffuse Checkerboard Preview",
            category=CATEGORY,
            description="Show an RGBA image over a checkerboard so that its transparency is visible.",
            inputs=[
                io.Image.Input("image", tooltip="An RGBA image (e.g. Layer Diffuse Decode (RGBA)); RGB passes through."),
                io.Int.Input("square", default=16, min=1, max=512, step=1, tooltip="Checkerboard square size in pixels."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="RGB image for Preview Image / Save Image.")],
        )

    @classmethod
    def execute(cls, image, square) -> io.NodeOutput:
        if image.shape[-1] != 4:
            return io.NodeOutput(image[..., :3])
        pixels = image.movedim(-1, 1)
        return io.NodeOutput(rgba.checkerboard_preview(pixels[:, :3], pixels[:, 3:], square).movedim(1, -1))


TRANSPARENT_VAE_NODES = [
    LayeredDiffusionDecode,
    LayeredDiffusionDecodeRGBA,
    LayeredDiffusionDecodeSplit,
    LayeredDiffusionEncode,
    LayeredDiffusionCheckerboard,
]
