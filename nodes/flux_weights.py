"""ComfyUI glue for the LayerDiffuse-Flux port's files: TransparentVAE (converted from its pickle
on first use; its Flux VAE, decoder and encoder) and the LoRA, applied through ComfyUI's own LoRA
loading.

Host internals used here: `folder_paths`, `comfy.sd.VAE(sd=...)`, `comfy.sd.load_lora_for_models`
and the warnings it logs for LoRA keys that fit nothing, a Flux model's `unet_config`.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator

import torch
from torch import nn

import comfy.sd
import folder_paths
from comfy.model_patcher import ModelPatcher
from comfy.sd import VAE

from ..lib_layerdiffuse import flux_vae
from ..lib_layerdiffuse.errors import ModelError, WeightFileError
from ..lib_layerdiffuse.weight_files import WEIGHT_FILES, read_safetensors
from . import model_store

LORA_NAME = "layerlora.safetensors"


def transparent_vae_path() -> str:
    """TransparentVAE.safetensors in a layer_model folder; made from TransparentVAE.pth (found
    there or downloaded from its official URL) on first use."""
    path = folder_paths.get_full_path(model_store.FOLDER, flux_vae.SAFETENSORS_NAME)
    if path is not None:
        return path
    pth = model_store.ensure_weight_file(WEIGHT_FILES[flux_vae.PTH_NAME])
    target = os.path.join(os.path.dirname(pth), flux_vae.SAFETENSORS_NAME)
    logging.info("LayerDiffuse: converting %s to %s (tensors only, no code is unpickled)", pth, target)
    flux_vae.convert_pth(pth, target)
    logging.info("LayerDiffuse: %s is no longer needed and can be deleted", pth)
    return target


def network(group: str, factory: Callable[[], nn.Module], dtype: torch.dtype | None = None) -> ModelPatcher:
    """One network of TransparentVAE.safetensors (`encoder` or `decoder`) as a ModelPatcher."""
    return model_store.network(transparent_vae_path(), factory, dtype, prefix=group + ".")


def load_flux_vae() -> VAE:
    """ComfyUI's VAE built from the `sd_vae.*` group of TransparentVAE.safetensors."""
    path = transparent_vae_path()
    state = read_safetensors(path, flux_vae.SD_VAE + ".")
    flux_vae.check_layout(state, f"{os.path.basename(path)} ({flux_vae.SD_VAE}.*)", flux_vae.flux_vae_layout())
    vae = comfy.sd.VAE(sd=state)
    vae.throw_exception_if_invalid()
    return vae


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


def require_flux_model(model: ModelPatcher, node: str) -> None:
    config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    if config.get("image_model") != "flux" or config.get("in_channels", 16) != flux_vae.LATENT_CHANNELS:
        raise ModelError(f"{node}: the model is not FLUX.1 (got {type(model.model).__name__}, "
                         f"image_model={config.get('image_model')!r}); the LayerDiffuse-Flux LoRA is for FLUX.1-dev")


def apply_lora(model: ModelPatcher, lora: dict[str, torch.Tensor], strength: float, file_name: str) -> ModelPatcher:
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


def transparent_vae_problem() -> str | None:
    """validate_inputs for the nodes that read TransparentVAE: None when either form of the file is
    there or can be downloaded, else what to do."""
    if folder_paths.get_full_path(model_store.FOLDER, flux_vae.SAFETENSORS_NAME) is not None:
        return None
    return model_store.missing_file_problem(WEIGHT_FILES[flux_vae.PTH_NAME])


def require_flux_vae(vae: VAE, node: str) -> None:
    if getattr(vae, "latent_channels", None) != flux_vae.LATENT_CHANNELS or getattr(vae, "latent_dim", 2) != 2:
        raise ModelError(f"{node}: this VAE makes {getattr(vae, 'latent_channels', '?')}-channel latents; connect the "
                         "Flux VAE (Layer Diffuse Flux VAE Loader)")
