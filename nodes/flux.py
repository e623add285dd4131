"""Flux nodes: transparent generation and transparent img2img with the LayerDiffuse-Flux port.

The user path: Layer Diffuse Flux Apply puts the port's LoRA on a FLUX.1-dev model; Layer Diffuse
Flux VAE Loader gives the Flux VAE stored in TransparentVAE (the one the port decodes with);
Layer Diffuse Flux Decode turns the sampled latent into RGBA and Layer Diffuse Flux Encode turns
an RGBA image into a latent for img2img. The decoder needs the VAE's *unclamped* pixels, which
VAE Decode does not give, so the Flux decode node takes the latent and the VAE and runs both.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator

import torch
from torch import nn

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..lib_layerdiffuse import flux_vae, rgba
from ..lib_layerdiffuse.transparent_vae import latent_with_offset
from ..lib_layerdiffuse.errors import InputError, ModelError, WeightFileError
from ..lib_layerdiffuse.weight_files import WEIGHT_FILES, read_safetensors
from . import model_store
from .rgba_io import alpha_for, rgba_image_inputs
from .transparent_vae import (
    speed_inputs,
    crop_to_multiple_of_8,
    decoder_weights_dtype,
    run_transparent_decoder,
    sub_batch_input,
    vae_posterior,
)

CATEGORY = "layer_diffuse/flux"
LORA_NAME = "layerlora.safetensors"


# --- weight files ---------------------------------------------------------------------------------

def transparent_vae_path() -> str:
    """TransparentVAE.safetensors in a layer_model folder; made from TransparentVAE.pth (found
    there or downloaded from its official URL) on first use."""
    path = folder_paths.get_full_path(model_store.FOLDER, flux_vae.SAFETENSORS_NAME)
    if path is not None:
        return path
    pth = model_store.weight_path(WEIGHT_FILES[flux_vae.PTH_NAME])
    target = os.path.join(os.path.dirname(pth), flux_vae.SAFETENSORS_NAME)
    logging.info("LayerDiffuse: converting %s to %s (tensors only, no code is unpickled)", pth, target)
    flux_vae.convert_pth(pth, target)
    logging.info("LayerDiffuse: %s is no longer needed and can be deleted", pth)
    return target


def network(group: str, factory: Callable[[], nn.Module], dtype: torch.dtype | None = None):
    """One network of TransparentVAE.safetensors (`encoder` or `decoder`) as a ModelPatcher."""
    return model_store.network(transparent_vae_path(), factory, dtype, prefix=group + ".")


def load_flux_vae() -> comfy.sd.VAE:
    """ComfyUI's VAE built from the `sd_vae.*` group of TransparentVAE.safetensors."""
    path = transparent_vae_path()
    state = read_safetensors(path, flux_vae.SD_VAE + ".")
    flux_vae.check_layout(state, f"{os.path.basename(path)} ({flux_vae.SD_VAE}.*)", flux_vae.flux_vae_layout())
    vae = comfy.sd.VAE(sd=state)
    vae.throw_exception_if_invalid()
    return vae


# --- the LoRA -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _warnings_logged() -> Iterator[list[str]]:
    """Collect the warnings logged inside the block (ComfyUI reports unmatched LoRA keys that way)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield messages
    finally:
        root.removeHandler(handler)


def require_flux_model(model, node: str) -> None:
    config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    if config.get("image_model") != "flux" or config.get("in_channels", 16) != flux_vae.LATENT_CHANNELS:
        raise ModelError(f"{node}: the model is not FLUX.1 (got {type(model.model).__name__}, "
                         f"image_model={config.get('image_model')!r}); the LayerDiffuse-Flux LoRA is for FLUX.1-dev")


def apply_lora(model, lora: dict[str, torch.Tensor], strength: float, file_name: str):
    """`model` with the LoRA patched in through ComfyUI's own LoRA loading (as LoraLoaderModelOnly).
    A key that matches nothing in the model is an error, not a warning."""
    with _warnings_logged() as warnings:
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    unmatched = [w for w in warnings if w.startswith(("lora key not loaded", "NOT LOADED"))]
    if unmatched:
        shown = "; ".join(unmatched[:5]) + (f"; ... ({len(unmatched) - 5} more)" if len(unmatched) > 5 else "")
        raise WeightFileError(f"{file_name}: {len(unmatched)} LoRA keys do not fit this model ({shown}). "
                              "Connect a FLUX.1-dev model and use the official layerlora.safetensors.")
    return patched


# --- decode and encode ----------------------------------------------------------------------------

def _require_flux_vae(vae, node: str) -> None:
    if getattr(vae, "latent_channels", None) != flux_vae.LATENT_CHANNELS or getattr(vae, "latent_dim", 2) != 2:
        raise ModelError(f"{node}: this VAE makes {getattr(vae, 'latent_channels', '?')}-channel latents; connect the "
                         "Flux VAE (Layer Diffuse Flux VAE Loader)")


def decode_unclamped(vae, latent: torch.Tensor) -> torch.Tensor:
    """VAE-decoded pixels [B,3,H,W] in about [0,1] but not clamped (VAE.decode clamps; the
    transparent decoder was trained on the unclamped values), with ComfyUI's memory handling."""
    vae.throw_exception_if_invalid()
    memory = vae.memory_used_decode(latent.shape, vae.vae_dtype)
    model_management.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=vae.disable_offload)
    step = max(1, int(model_management.get_free_memory(vae.device) / max(1, memory)))
    pixels = []
    for start in range(0, latent.shape[0], step):
        z = latent[start : start + step].to(vae.vae_dtype).to(vae.device)
        pixels.append((vae.first_stage_model.decode(z).float() * 0.5 + 0.5).to(vae.output_device))
    return torch.cat(pixels)


def decode_rgba(samples: dict, vae, sub_batch_size: int, passes: str = "8", precision: str = "auto") -> torch.Tensor:
    """[B,H,W,4] RGBA (alpha last, 1 = opaque) for a Flux LATENT."""
    node = "Layer Diffuse Flux Decode"
    _require_flux_vae(vae, node)
    latent = samples["samples"]
    if latent.dim() != 4 or latent.shape[1] != flux_vae.LATENT_CHANNELS:
        raise InputError(f"{node}: expected a Flux latent [B,16,h,w], got shape {list(latent.shape)}; connect the "
                         "KSampler output of a Flux model")
    pixel = decode_unclamped(vae, latent)
    patcher = network(flux_vae.DECODER, flux_vae.decoder, decoder_weights_dtype(precision))
    # The Flux files predict R,G,B,A: already the IMAGE channel order.
    return run_transparent_decoder(patcher, pixel, latent, sub_batch_size, passes).movedim(1, -1)


def encode_rgba(vae, image: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The raw Flux latent [B,16,H/8,W/8] that carries the image's alpha."""
    node = "Layer Diffuse Flux Encode"
    _require_flux_vae(vae, node)
    alpha = crop_to_multiple_of_8(alpha_for(image, mask, node))
    rgb = crop_to_multiple_of_8(image[..., :3].movedim(-1, 1).float())
    if min(rgb.shape[-2:]) < 8:
        raise InputError(f"{node}: the image is {image.shape[2]}x{image.shape[1]}; it must be at least 8x8")
    patcher = network(flux_vae.ENCODER, flux_vae.encoder)
    encoder = model_store.load_to_device(patcher, rgb.numel() * 64)
    offset = flux_vae.transparency_offset(encoder, rgb, alpha)
    mean, std = vae_posterior(vae, rgba.flatten_on_grey(rgb, alpha))
    return latent_with_offset(mean, std, offset)


# --- nodes ----------------------------------------------------------------------------------------

class LayeredDiffusionFluxApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionFluxApply",
            display_name="Layer Diffuse Flux Apply",
            category=CATEGORY,
            description="Make a FLUX.1-dev model generate transparent-ready latents: applies the LayerDiffuse-Flux "
                        "LoRA (layerlora.safetensors, downloaded to models/layer_model on first use).",
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1-dev model (Load Diffusion Model)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength; 1.0 is what the port uses."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the LayerDiffuse-Flux LoRA.")],
        )

    @classmethod
    def execute(cls, model, strength) -> io.NodeOutput:
        require_flux_model(model, "Layer Diffuse Flux Apply")
        path = model_store.weight_path(WEIGHT_FILES[LORA_NAME])
        return io.NodeOutput(apply_lora(model, read_safetensors(path), strength, LORA_NAME))


class LayeredDiffusionFluxVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionFluxVAELoader",
            display_name="Layer Diffuse Flux VAE Loader",
            category=CATEGORY,
            description="The Flux VAE stored in the LayerDiffuse-Flux TransparentVAE file, the one its transparent "
                        "decoder and encoder were made with. Downloads TransparentVAE.pth to models/layer_model and "
                        "converts it to TransparentVAE.safetensors on first use.",
            inputs=[],
            outputs=[io.Vae.Output(display_name="VAE", tooltip="The Flux VAE, for the Layer Diffuse Flux Decode/Encode "
                                   "nodes (and any other Flux VAE use).")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(load_flux_vae())


class LayeredDiffusionFluxDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionFluxDecode",
            display_name="Layer Diffuse Flux Decode (RGBA)",
            category=CATEGORY,
            description="Decode a Flux latent made with Layer Diffuse Flux Apply into an RGBA image (use it instead "
                        "of VAE Decode: the transparent decoder needs the VAE's unclamped output).",
            inputs=[
                io.Latent.Input("samples", tooltip="The Flux latents to decode (KSampler's output)."),
                io.Vae.Input("vae", tooltip="The Flux VAE (Layer Diffuse Flux VAE Loader)."),
                sub_batch_input(),
                *speed_inputs(),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="RGBA image (4 channels, alpha last) for Save Image."),
                io.Mask.Output(display_name="MASK", tooltip="The predicted alpha: 1 = opaque, 0 = transparent (the "
                               "opposite of LoadImage's mask; invert it to use it as one)."),
            ],
        )

    @classmethod
    def execute(cls, samples, vae, sub_batch_size, passes="8", precision="auto") -> io.NodeOutput:
        image = decode_rgba(samples, vae, sub_batch_size, passes, precision)
        return io.NodeOutput(image, image[..., 3])


class LayeredDiffusionFluxEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionFluxEncode",
            display_name="Layer Diffuse Flux Encode (RGBA)",
            category=CATEGORY,
            description="Encode a transparent image into a Flux latent that carries its alpha, for transparent "
                        "img2img (KSampler with denoise < 1, then Layer Diffuse Flux Decode).",
            inputs=[
                io.Vae.Input("vae", tooltip="The Flux VAE (Layer Diffuse Flux VAE Loader)."),
                *rgba_image_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The transparent Flux latent.")],
        )

    @classmethod
    def execute(cls, vae, image, mask=None) -> io.NodeOutput:
        return io.NodeOutput({"samples": encode_rgba(vae, image, mask)})


FLUX_NODES = [
    LayeredDiffusionFluxApply,
    LayeredDiffusionFluxVAELoader,
    LayeredDiffusionFluxDecode,
    LayeredDiffusionFluxEncode,
]
