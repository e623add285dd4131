"""Flux nodes: transparent generation and transparent img2img with the LayerDiffuse-Flux port.

The user path: Layer Diffuse Flux Apply puts the port's LoRA on a FLUX.1-dev model; Layer Diffuse
Flux VAE Loader gives the Flux VAE stored in TransparentVAE (the one the port decodes with);
Layer Diffuse Flux Decode turns the sampled latent into RGBA and Layer Diffuse Flux Encode turns
an RGBA image into a latent for img2img. The decoder needs the VAE's *unclamped* pixels, which
VAE Decode does not give, so the Flux decode node takes the latent and the VAE and runs both.
The file glue is in flux_weights.py; what these nodes share with the SD ones, in vae_pipeline.py.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..lib_layerdiffuse import flux_vae, vae_family
from ..lib_layerdiffuse.weight_files import FLUX, WEIGHT_FILES, read_safetensors
from . import model_store
from .flux_weights import (
    LORA_NAME,
    apply_lora,
    load_flux_vae,
    require_flux_vae,
    transparent_vae_fingerprint,
    transparent_vae_network,
    transparent_vae_problem,
)
from .host_compat import schema
from .modes import require_family
from .naming import FLUX_CATEGORY, SEARCH_ALIASES
from .rgba_io import alpha_output, rgba_image_inputs
from .vae_pipeline import decode_rgba, decode_unclamped, encode_transparent, speed_inputs, sub_batch_input

STRENGTH = io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                          tooltip="LoRA strength; 1.0 is what the port uses.")
SUB_BATCH = sub_batch_input()


def _in_range(value: float, spec: io.Input) -> bool | str:
    """The range check ComfyUI leaves to a node's validate_inputs for the inputs it takes."""
    if spec.min <= value <= spec.max:
        return True
    return f"{spec.id} must be between {spec.min} and {spec.max}, not {value}"


class LayeredDiffusionFluxApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionFluxApply",
            display_name="Layer Diffuse Flux Apply",
            category=FLUX_CATEGORY,
            search_aliases=SEARCH_ALIASES,
            description="Make a FLUX.1-dev model generate transparent-ready latents: applies the LayerDiffuse-Flux "
                        "LoRA (layerlora.safetensors, downloaded to models/layer_model on first use).",
            inputs=[io.Model.Input("model", tooltip="A FLUX.1-dev model (Load Diffusion Model)."), STRENGTH],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the LayerDiffuse-Flux LoRA.")],
        )

    @classmethod
    def validate_inputs(cls, strength: float | None = None) -> bool | str:
        if strength is None:
            return True
        return model_store.missing_file_problem(WEIGHT_FILES[LORA_NAME]) or _in_range(strength, STRENGTH)

    @classmethod
    def fingerprint_inputs(cls, **_) -> tuple:
        return model_store.files_fingerprint(LORA_NAME)

    @classmethod
    def execute(cls, model: io.Model.Type, strength: float) -> io.NodeOutput:
        require_family(model, FLUX, "Layer Diffuse Flux Apply")
        path = model_store.ensure_weight_file(WEIGHT_FILES[LORA_NAME])
        return io.NodeOutput(apply_lora(model, read_safetensors(path), strength, LORA_NAME))


class LayeredDiffusionFluxVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionFluxVAELoader",
            display_name="Layer Diffuse Flux VAE Loader",
            category=FLUX_CATEGORY,
            search_aliases=SEARCH_ALIASES,
            description="The Flux VAE stored in the LayerDiffuse-Flux TransparentVAE file, the one its transparent "
                        "decoder and encoder were made with. Downloads TransparentVAE.pth to models/layer_model and "
                        "converts it to TransparentVAE.safetensors on first use.",
            inputs=[],
            outputs=[io.Vae.Output(display_name="VAE", tooltip="The Flux VAE, for the Layer Diffuse Flux Decode/Encode "
                                   "nodes (and any other Flux VAE use).")],
        )

    @classmethod
    def fingerprint_inputs(cls, **_) -> tuple:
        return transparent_vae_fingerprint()

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(load_flux_vae())


class LayeredDiffusionFluxDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionFluxDecode",
            display_name="Layer Diffuse Flux Decode (RGBA)",
            category=FLUX_CATEGORY,
            search_aliases=SEARCH_ALIASES,
            description="Decode a Flux latent made with Layer Diffuse Flux Apply into an RGBA image (use it instead "
                        "of VAE Decode: the transparent decoder needs the VAE's unclamped output).",
            inputs=[
                io.Latent.Input("samples", tooltip="The Flux latents to decode (KSampler's output)."),
                io.Vae.Input("vae", tooltip="The Flux VAE (Layer Diffuse Flux VAE Loader)."),
                SUB_BATCH,
                *speed_inputs(),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="RGBA image (4 channels, alpha last) for Save Image."),
                alpha_output(),
            ],
        )

    @classmethod
    def validate_inputs(cls, sub_batch_size: int | None = None) -> bool | str:
        if sub_batch_size is None:
            return True
        return transparent_vae_problem() or _in_range(sub_batch_size, SUB_BATCH)

    @classmethod
    def fingerprint_inputs(cls, **_) -> tuple:
        return transparent_vae_fingerprint()

    @classmethod
    def execute(cls, samples: io.Latent.Type, vae: io.Vae.Type, sub_batch_size: int, passes: str = "8",
                precision: str = "auto") -> io.NodeOutput:
        node = "Layer Diffuse Flux Decode"
        require_flux_vae(vae, node)
        family = vae_family.FLUX
        image = decode_rgba(family, node, samples["samples"], lambda latent: decode_unclamped(vae, latent),
                            lambda dtype: transparent_vae_network(flux_vae.DECODER_GROUP, family.decoder, dtype),
                            sub_batch_size, passes, precision)
        return io.NodeOutput(image, image[..., 3])


class LayeredDiffusionFluxEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionFluxEncode",
            display_name="Layer Diffuse Flux Encode (RGBA)",
            category=FLUX_CATEGORY,
            search_aliases=SEARCH_ALIASES,
            description="Encode a transparent image into a Flux latent that carries its alpha, for transparent "
                        "img2img (KSampler with denoise < 1, then Layer Diffuse Flux Decode).",
            inputs=[
                io.Vae.Input("vae", tooltip="The Flux VAE (Layer Diffuse Flux VAE Loader)."),
                *rgba_image_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The transparent Flux latent.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **_) -> tuple:
        return transparent_vae_fingerprint()

    @classmethod
    def execute(cls, vae: io.Vae.Type, image: io.Image.Type, mask: io.Mask.Type = None) -> io.NodeOutput:
        node = "Layer Diffuse Flux Encode"
        require_flux_vae(vae, node)
        encoder = transparent_vae_network(flux_vae.ENCODER_GROUP, vae_family.FLUX.encoder)
        return io.NodeOutput({"samples": encode_transparent(vae_family.FLUX, node, vae, image, mask, encoder)})


FLUX_NODES = [
    LayeredDiffusionFluxApply,
    LayeredDiffusionFluxVAELoader,
    LayeredDiffusionFluxDecode,
    LayeredDiffusionFluxEncode,
]
