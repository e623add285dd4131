"""The LayerDiffuse generation modes: which config string loads which file for which model family,
and telling a connected model's family apart (SD1.5, SDXL, FLUX.1).

The config strings, and which node offers which, are those of huchenlei/ComfyUI-layerdiffuse, so
workflows saved with that pack keep their values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import comfy.supported_models
from comfy.model_patcher import ModelPatcher

from ..lib_layerdiffuse.errors import ModelError
from ..lib_layerdiffuse.flux_vae import LATENT_CHANNELS as FLUX_LATENT_CHANNELS
from ..lib_layerdiffuse.weight_files import FLUX, SD15, SDXL, WEIGHT_FILES, WeightFile


@dataclass(frozen=True)
class Mode:
    """One generation mode: the config string, its weight file, the model family it is for, how
    many images it generates together (frames) and whether it takes the given layer's image."""
    config: str
    file: str
    family: str
    frames: int = 1
    control: bool = False

    @property
    def weight_file(self) -> WeightFile:
        return WEIGHT_FILES[self.file]


APPLY_MODES = (
    Mode("SDXL, Attention Injection", "layer_xl_transparent_attn.safetensors", SDXL),
    Mode("SDXL, Conv Injection", "layer_xl_transparent_conv.safetensors", SDXL),
    Mode("SD15, Attention Injection, attn_sharing", "layer_sd15_transparent_attn.safetensors", SD15),
)
JOINT_MODES = (Mode("SD15, attn_sharing, Batch size (3N)", "layer_sd15_joint.safetensors", SD15, frames=3),)
COND_MODES = (
    Mode("SDXL, Foreground", "layer_xl_fg2ble.safetensors", SDXL),
    Mode("SDXL, Background", "layer_xl_bg2ble.safetensors", SDXL),
)
COND_JOINT_MODES = (
    Mode("SD15, Foreground, attn_sharing, Batch size (2N)", "layer_sd15_fg2bg.safetensors", SD15, frames=2, control=True),
    Mode("SD15, Background, attn_sharing, Batch size (2N)", "layer_sd15_bg2fg.safetensors", SD15, frames=2, control=True),
)
DIFF_MODES = (
    Mode("SDXL, Foreground", "layer_xl_fgble2bg.safetensors", SDXL),
    Mode("SDXL, Background", "layer_xl_bgble2fg.safetensors", SDXL),
)


def find_mode(modes: Sequence[Mode], config: str) -> Mode:
    for mode in modes:
        if mode.config == config:
            return mode
    raise ModelError(f"unknown config {config!r}; choose one of: {', '.join(m.config for m in modes)}")


def model_family(model: ModelPatcher) -> str | None:
    """SD15, SDXL or FLUX (FLUX.1 with its 16-channel latent), from ComfyUI's own detection of the
    checkpoint; None for any other model. The one place the pack tells families apart."""
    config = model.model.model_config
    if isinstance(config, comfy.supported_models.SDXL):
        return SDXL
    if isinstance(config, comfy.supported_models.SD15):
        return SD15
    unet = config.unet_config or {}
    if unet.get("image_model") == "flux" and unet.get("in_channels", FLUX_LATENT_CHANNELS) == FLUX_LATENT_CHANNELS:
        return FLUX
    return None


def _described(model: ModelPatcher, family: str | None) -> str:
    name = type(model.model.model_config).__name__
    return f"{family} ({name})" if family else name


def require_family(model: ModelPatcher, family: str, node: str) -> None:
    """Raise a ModelError naming `node` and the cure unless `model` is of `family`."""
    found = model_family(model)
    if found == family:
        return
    if family == FLUX:
        cure = ("Connect a FLUX.1-dev model (Load Diffusion Model)"
                + ("; for SD1.5 and SDXL models use Layer Diffuse Apply." if found in (SD15, SDXL) else "."))
        raise ModelError(f"{node}: the LayerDiffuse-Flux LoRA is for FLUX.1-dev, but the connected model is "
                         f"{_described(model, found)}. {cure}")
    cure = ("For FLUX.1 use Layer Diffuse Flux Apply." if found == FLUX
            else "LayerDiffuse has no weights for this family: load an SD1.5 or SDXL checkpoint.")
    raise ModelError(f"{node}: this node works with SD1.5 and SDXL models; the connected model is "
                     f"{_described(model, found)}. {cure}")


def check_family(model: ModelPatcher, mode: Mode, node: str) -> None:
    """Raise a ModelError naming `node` unless `model` is of the family `mode` is for."""
    family = model_family(model)
    if family == mode.family:
        return
    if family not in (SD15, SDXL):
        require_family(model, mode.family, node)  # another family altogether: raises
    raise ModelError(
        f"{node}: the config '{mode.config}' is for {mode.family} models, but the connected model is "
        f"{_described(model, family)}. Choose a {family} config, or load a {mode.family} checkpoint.")
