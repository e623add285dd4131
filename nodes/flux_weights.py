"""ComfyUI glue for the LayerDiffuse-Flux port's files: TransparentVAE (converted from its pickle
on first use; its Flux VAE, decoder and encoder) and the LoRA, applied through ComfyUI's own LoRA
loading.

Host internals used here: `folder_paths`, `comfy.sd.VAE(sd=...)` and the VAE's `latent_channels`
and `latent_dim`; the LoRA goes through lora_fit.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from torch import nn

import comfy.sd
import folder_paths
from comfy.model_patcher import ModelPatcher
from comfy.sd import VAE

from ..lib_layerdiffuse import flux_vae
from ..lib_layerdiffuse.errors import ModelError
from ..lib_layerdiffuse.weight_files import WEIGHT_FILES, read_safetensors
from . import lora_fit, model_store

LORA_NAME = "layerlora.safetensors"


def ensure_flux_transparent_vae() -> str:
    """The path of TransparentVAE.safetensors in a layer_model folder; on first use it is made
    from TransparentVAE.pth (found there, or downloaded from its official URL)."""
    path = folder_paths.get_full_path(model_store.FOLDER, flux_vae.SAFETENSORS_NAME)
    if path is not None:
        return path
    pth = model_store.ensure_weight_file(WEIGHT_FILES[flux_vae.PTH_NAME])
    target = os.path.join(os.path.dirname(pth), flux_vae.SAFETENSORS_NAME)
    logging.info("LayerDiffuse: converting %s to %s (tensors only, no code is unpickled)", pth, target)
    flux_vae.convert_pth(pth, target)
    logging.info("LayerDiffuse: %s is no longer needed and can be deleted", pth)
    return target


def transparent_vae_network(group: str, factory: Callable[..., nn.Module],
                            dtype: torch.dtype | None = None) -> ModelPatcher:
    """One network of TransparentVAE.safetensors (`encoder` or `decoder`) as a ModelPatcher."""
    return model_store.network(ensure_flux_transparent_vae(), factory, dtype, prefix=group + ".")


def load_flux_vae() -> VAE:
    """ComfyUI's VAE built from the `sd_vae.*` group of TransparentVAE.safetensors."""
    path = ensure_flux_transparent_vae()
    state = read_safetensors(path, flux_vae.SD_VAE + ".")
    flux_vae.check_layout(state, f"{os.path.basename(path)} ({flux_vae.SD_VAE}.*)", flux_vae.flux_vae_layout())
    vae = comfy.sd.VAE(sd=state)
    vae.throw_exception_if_invalid()
    return vae


def apply_lora(model: ModelPatcher, lora: dict[str, torch.Tensor], strength: float, file_name: str) -> ModelPatcher:
    """`model` with the LoRA patched in through ComfyUI's own LoRA loading (as LoraLoaderModelOnly).
    A key that fits nothing in the model is an error, not a warning."""
    return lora_fit.apply_lora(model, lora, strength, file_name,
                               "Connect a FLUX.1-dev model and use the official layerlora.safetensors.")


def transparent_vae_problem() -> str | None:
    """validate_inputs for the nodes that read TransparentVAE: None when either form of the file is
    there or can be downloaded, else what to do."""
    if folder_paths.get_full_path(model_store.FOLDER, flux_vae.SAFETENSORS_NAME) is not None:
        return None
    return model_store.missing_file_problem(WEIGHT_FILES[flux_vae.PTH_NAME])


def transparent_vae_fingerprint() -> tuple:
    """fingerprint_inputs for the nodes that read TransparentVAE (either form of the file)."""
    return model_store.files_fingerprint(flux_vae.SAFETENSORS_NAME, flux_vae.PTH_NAME)


def require_flux_vae(vae: VAE, node: str) -> None:
    if vae.latent_channels != flux_vae.LATENT_CHANNELS or vae.latent_dim != 2:
        raise ModelError(f"{node}: this VAE makes {vae.latent_channels}-channel latents; connect the "
                         "Flux VAE (Layer Diffuse Flux VAE Loader)")
