"""Transparent VAE nodes for SD1.5/SDXL: decode a latent to RGBA, encode RGBA to a latent, preview
RGBA over a checkerboard.

Node ids, input names/order, combo strings and outputs of the decode nodes are those of
huchenlei/ComfyUI-layerdiffuse, so workflows saved with that pack open and run unchanged. What
these nodes share with the Flux ones is in vae_pipeline.py.
"""
from __future__ import annotations

import torch

from comfy_api.latest import io

from ..lib_layerdiffuse import rgba
from ..lib_layerdiffuse.errors import InputError, ModelError
from ..lib_layerdiffuse.vae_family import SD
from ..lib_layerdiffuse.weight_files import SD15, SDXL, TRANSPARENT_DECODERS, TRANSPARENT_ENCODERS
from . import model_store
from .host_compat import schema
from .naming import CATEGORY, SEARCH_ALIASES
from .rgba_io import alpha_output, rgba_image_inputs
from .vae_pipeline import decode_rgba, encode_transparent, speed_inputs, sub_batch_input

MAX_FRAMES = 3


def _sd_version_input() -> io.Combo.Input:
    return io.Combo.Input(
        "sd_version", options=[SD15, SDXL], default=SDXL,
        tooltip="Which transparent VAE weights to use: SD15 for SD1.5 models, SDXL for SDXL models.",
    )


def _samples_input() -> io.Latent.Input:
    return io.Latent.Input("samples", tooltip="The latents that were decoded into `images` (e.g. KSampler's output).")


def _images_input() -> io.Image.Input:
    return io.Image.Input("images", tooltip="VAE Decode's output for the same latents.")


def decode_sd_rgba(node: str, latent: torch.Tensor, images: torch.Tensor, sd_version: str, sub_batch_size: int,
                   passes: str = "8", precision: str = "auto") -> torch.Tensor:
    """[B,H,W,4] RGBA (alpha last, 1 = opaque) for ComfyUI latents and their decoded images."""
    def load_decoder(dtype: torch.dtype | None):
        path = model_store.ensure_weight_file(TRANSPARENT_DECODERS[sd_version])
        return model_store.network(path, SD.decoder, dtype)

    return decode_rgba(SD, node, latent, lambda _: images.movedim(-1, 1), load_decoder, sub_batch_size, passes,
                       precision)


def _decode_inputs() -> list[io.Input]:
    return [_samples_input(), _images_input(), _sd_version_input(), sub_batch_input(), *speed_inputs()]


class LayeredDiffusionDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionDecode",
            display_name="Layer Diffuse Decode",
            category=CATEGORY,
            search_aliases=SEARCH_ALIASES,
            description="Recover the transparent image from a LayerDiffuse latent and its VAE-decoded image.",
            inputs=_decode_inputs(),
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The foreground colours (RGB)."),
                alpha_output(),
            ],
        )

    @classmethod
    def validate_inputs(cls, sd_version: str | None = None) -> bool | str:
        return model_store.validate_file_choice("sd_version", sd_version, TRANSPARENT_DECODERS)

    @classmethod
    def fingerprint_inputs(cls, sd_version: str | None = None, **_) -> tuple:
        return model_store.chosen_file_fingerprint(sd_version, TRANSPARENT_DECODERS)

    @classmethod
    def execute(cls, samples: io.Latent.Type, images: io.Image.Type, sd_version: str, sub_batch_size: int,
                passes: str = "8", precision: str = "auto") -> io.NodeOutput:
        image = decode_sd_rgba("Layer Diffuse Decode", samples["samples"], images, sd_version, sub_batch_size, passes,
                               precision)
        return io.NodeOutput(image[..., :3], image[..., 3])


class LayeredDiffusionDecodeRGBA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionDecodeRGBA",
            display_name="Layer Diffuse Decode (RGBA)",
            category=CATEGORY,
            search_aliases=SEARCH_ALIASES,
            description="Recover the transparent image as one RGBA image; Save Image writes it as a PNG with alpha.",
            inputs=_decode_inputs(),
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="RGBA image (4 channels, alpha last).")],
        )

    @classmethod
    def validate_inputs(cls, sd_version: str | None = None) -> bool | str:
        return model_store.validate_file_choice("sd_version", sd_version, TRANSPARENT_DECODERS)

    @classmethod
    def fingerprint_inputs(cls, sd_version: str | None = None, **_) -> tuple:
        return model_store.chosen_file_fingerprint(sd_version, TRANSPARENT_DECODERS)

    @classmethod
    def execute(cls, samples: io.Latent.Type, images: io.Image.Type, sd_version: str, sub_batch_size: int,
                passes: str = "8", precision: str = "auto") -> io.NodeOutput:
        return io.NodeOutput(decode_sd_rgba("Layer Diffuse Decode (RGBA)", samples["samples"], images, sd_version,
                                            sub_batch_size, passes, precision))


class LayeredDiffusionDecodeSplit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionDecodeSplit",
            display_name="Layer Diffuse Decode (Split)",
            category=CATEGORY,
            search_aliases=SEARCH_ALIASES,
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
    def validate_inputs(cls, sd_version: str | None = None) -> bool | str:
        return model_store.validate_file_choice("sd_version", sd_version, TRANSPARENT_DECODERS)

    @classmethod
    def fingerprint_inputs(cls, sd_version: str | None = None, **_) -> tuple:
        return model_store.chosen_file_fingerprint(sd_version, TRANSPARENT_DECODERS)

    @classmethod
    def execute(cls, samples: io.Latent.Type, images: io.Image.Type, frames: int, sd_version: str,
                sub_batch_size: int, passes: str = "8", precision: str = "auto") -> io.NodeOutput:
        node = "Layer Diffuse Decode (Split)"
        if images.shape[0] % frames:
            raise InputError(
                f"{node}: the batch has {images.shape[0]} images, not a multiple of frames={frames}; "
                "set frames to the number of layers the model generated per image"
            )
        first = decode_sd_rgba(node, samples["samples"][::frames], images[::frames], sd_version, sub_batch_size,
                               passes, precision)
        layers = [first] + [images[i::frames] for i in range(1, frames)]
        return io.NodeOutput(*layers, *([None] * (MAX_FRAMES - frames)))


class LayeredDiffusionEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionEncode",
            display_name="Layer Diffuse Encode (RGBA)",
            category=CATEGORY,
            search_aliases=SEARCH_ALIASES,
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
    def validate_inputs(cls, sd_version: str | None = None) -> bool | str:
        return model_store.validate_file_choice("sd_version", sd_version, TRANSPARENT_ENCODERS)

    @classmethod
    def fingerprint_inputs(cls, sd_version: str | None = None, **_) -> tuple:
        return model_store.chosen_file_fingerprint(sd_version, TRANSPARENT_ENCODERS)

    @classmethod
    def execute(cls, vae: io.Vae.Type, image: io.Image.Type, sd_version: str,
                mask: io.Mask.Type = None) -> io.NodeOutput:
        node = "Layer Diffuse Encode"
        if vae.latent_channels != SD.latent_channels:
            raise ModelError(f"{node}: this VAE makes {vae.latent_channels}-channel latents; "
                             f"the {sd_version} transparent encoder is for the 4-channel SD1.5/SDXL VAE")
        path = model_store.ensure_weight_file(TRANSPARENT_ENCODERS[sd_version])
        encoder = model_store.network(path, SD.encoder)
        return io.NodeOutput({"samples": encode_transparent(SD, node, vae, image, mask, encoder)})


class LayeredDiffusionCheckerboard(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionCheckerboard",
            display_name="Layer Diffuse Checkerboard Preview",
            category=CATEGORY,
            search_aliases=SEARCH_ALIASES,
            description="Show an RGBA image over a checkerboard so that its transparency is visible.",
            inputs=[
                io.Image.Input("image", tooltip="An RGBA image (e.g. Layer Diffuse Decode (RGBA)); RGB passes through."),
                io.Int.Input("square", default=16, min=1, max=512, step=1, tooltip="Checkerboard square size in pixels."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="RGB image for Preview Image / Save Image.")],
        )

    @classmethod
    def execute(cls, image: io.Image.Type, square: int) -> io.NodeOutput:
        rgb, alpha = rgba.split_image(image, "Layer Diffuse Checkerboard Preview", "image")
        if alpha is None:
            return io.NodeOutput(rgb.movedim(1, -1))
        return io.NodeOutput(rgba.checkerboard_preview(rgb, alpha, square).movedim(1, -1))


TRANSPARENT_VAE_NODES = [
    LayeredDiffusionDecode,
    LayeredDiffusionDecodeRGBA,
    LayeredDiffusionDecodeSplit,
    LayeredDiffusionEncode,
    LayeredDiffusionCheckerboard,
]
