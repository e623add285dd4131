"""The official LayerDiffuse weight files, and loading them with strict layout checks.

One registry (`WEIGHT_FILES`) names every file the pack uses: its file name, the Hugging Face
repository it comes from, model family and what it holds. Loading is safetensors only (never pickle); a file whose keys or
shapes differ from the network's raises `WeightFileError` naming the file and the differences.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from .download import HUB
from .errors import WeightFileError

OFFICIAL_REPO = "LayerDiffusion/layerdiffusion-v1"
FLUX_REPO = "RedAIGC/Flux-version-LayerDiffuse"

SD15 = "SD15"
SDXL = "SDXL"
FLUX = "FLUX"


@dataclass(frozen=True)
class WeightFile:
    name: str
    family: str
    kind: str
    repo_id: str

    @property
    def url(self) -> str:
        """Where the file is published on the Hugging Face Hub."""
        return f"{HUB}/{self.repo_id}/resolve/main/{self.name}"


def _official(name: str, family: str, kind: str) -> WeightFile:
    return WeightFile(name, family, kind, OFFICIAL_REPO)


WEIGHT_FILES: dict[str, WeightFile] = {
    wf.name: wf
    for wf in (
        _official("vae_transparent_decoder.safetensors", SDXL, "transparent decoder"),
        _official("vae_transparent_encoder.safetensors", SDXL, "transparent encoder"),
        _official("layer_sd15_vae_transparent_decoder.safetensors", SD15, "transparent decoder"),
        _official("layer_sd15_vae_transparent_encoder.safetensors", SD15, "transparent encoder"),
        _official("layer_xl_transparent_attn.safetensors", SDXL, "foreground attention LoRA"),
        _official("layer_xl_transparent_conv.safetensors", SDXL, "foreground conv offsets"),
        _official("layer_xl_fg2ble.safetensors", SDXL, "foreground to blended"),
        _official("layer_xl_bg2ble.safetensors", SDXL, "background to blended"),
        _official("layer_xl_fgble2bg.safetensors", SDXL, "foreground and blended to background"),
        _official("layer_xl_bgble2fg.safetensors", SDXL, "background and blended to foreground"),
        _official("layer_sd15_transparent_attn.safetensors", SD15, "foreground attention sharing"),
        _official("layer_sd15_joint.safetensors", SD15, "joint attention sharing"),
        _official("layer_sd15_fg2bg.safetensors", SD15, "foreground to background attention sharing"),
        _official("layer_sd15_bg2fg.safetensors", SD15, "background to foreground attention sharing"),
        # The Flux port (a third-party LayerDiffuse for FLUX.1-dev). TransparentVAE.pth is a pickle:
        # lib_layerdiffuse.flux_vae converts it to TransparentVAE.safetensors before anything loads it.
        WeightFile("TransparentVAE.pth", FLUX, "Flux VAE, transparent encoder and decoder (pickle)", FLUX_REPO),
        WeightFile("layerlora.safetensors", FLUX, "transparent generation LoRA for FLUX.1-dev", FLUX_REPO),
    )
}

TRANSPARENT_DECODERS = {SD15: WEIGHT_FILES["layer_sd15_vae_transparent_decoder.safetensors"],
                        SDXL: WEIGHT_FILES["vae_transparent_decoder.safetensors"]}
TRANSPARENT_ENCODERS = {SD15: WEIGHT_FILES["layer_sd15_vae_transparent_encoder.safetensors"],
                        SDXL: WEIGHT_FILES["vae_transparent_encoder.safetensors"]}


def read_safetensors(path: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file on the CPU, or only those whose names start with
    `prefix` (with the prefix removed). Unreadable files raise WeightFileError."""
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(path)
    if not path.endswith(".safetensors"):
        raise WeightFileError(f"{name}: only .safetensors weight files are loaded (never pickles)")
    if not os.path.isfile(path):
        raise WeightFileError(f"{name}: no such file: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightFileError(
            f"{name} is corrupt or incomplete ({error}); delete {path} and download it again"
        ) from error


def layout_differences(expected: Mapping[str, tuple], actual: Mapping[str, tuple]) -> list[str]:
    """Human-readable lines for missing keys, unexpected keys and shape mismatches."""
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    wrong = sorted(k for k in set(expected) & set(actual) if tuple(expected[k]) != tuple(actual[k]))

    def listing(keys: list[str], limit: int = 12) -> str:
        shown = ", ".join(keys[:limit])
        return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")

    lines = []
    if missing:
        lines.append(f"missing {len(missing)} keys: {listing(missing)}")
    if unexpected:
        lines.append(f"unexpected {len(unexpected)} keys: {listing(unexpected)}")
    if wrong:
        lines.append("wrong shapes: " + listing([f"{k} {list(actual[k])} (expected {list(expected[k])})" for k in wrong]))
    return lines


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], file_name: str,
                layout: nn.Module | None = None) -> nn.Module:
    """Load `state_dict` into `module` (built on any device, the meta device included) after
    checking that keys and shapes match exactly those of `layout` (by default the module itself).
    Returns the module, now holding the tensors."""
    expected = {k: tuple(v.shape) for k, v in (layout or module).state_dict().items()}
    problems = layout_differences(expected, {k: tuple(v.shape) for k, v in state_dict.items()})
    if problems:
        raise WeightFileError(
            f"{file_name} does not have the layout of a {type(module).__name__} weight file: "
            + "; ".join(problems)
            + ". Check that the file is the official one for this node and setting."
        )
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module


def build_model(factory: Callable[..., nn.Module], state_dict: Mapping[str, torch.Tensor], file_name: str,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                operations=None) -> nn.Module:
    """Build a network without allocating its random init (meta device), load the file's tensors
    strictly and move it to `device`/`dtype` in inference mode. Convolution weights are stored
    channels-last, the faster layout for these small-channel convolutions on CPU and GPU.
    Submodules a network lists in `FLOAT32_MODULES` stay float32 whatever `dtype` is.
    `operations`: the layer classes to build from (`factory(operations=...)`), else torch's."""
    with torch.device("meta"):
        module = factory() if operations is None else factory(operations=operations)
        # The file is checked against torch's layers: a host's may create their tensors only as
        # the file loads (ComfyUI's Linear does with its dynamic VRAM).
        layout = None if operations is None else factory()
    load_strict(module, state_dict, file_name, layout)
    module = module.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    for name in getattr(module, "FLOAT32_MODULES", ()):
        module.get_submodule(name).float()
    return module.eval().requires_grad_(False)
