"""The Flux port of LayerDiffuse (RedAIGC/Flux-version-LayerDiffuse): its TransparentVAE file.

`TransparentVAE.pth` is one pickled state dict with three groups: `sd_vae.*` (a complete Flux VAE
in diffusers naming), `encoder.*` (the latent-offset encoder, 16 latent channels) and `decoder.*`
(the transparent decoder, 16 latent channels). This module converts that pickle once into
`TransparentVAE.safetensors` (unpickling tensors only, then checking every key and shape), splits
it into its groups, and builds the two networks with 16 latent channels. How the Flux networks differ
from the SD1.5/SDXL ones otherwise (channel order, offset scale, grey) is `vae_family.FLUX`;
decoding and encoding are shared with SD1.5/SDXL in `transparent_vae`.
"""
from __future__ import annotations

import os
import pickle
import re
import sys
import zipfile
from typing import Mapping

import torch
from torch import nn

from .atomic_write import atomic_write
from .offset_encoder import LatentTransparencyOffsetEncoder
from .unet1024 import UNet1024
from .errors import WeightFileError
from .weight_files import layout_differences

# Both networks take the raw Flux latent (LATENT["samples"]), not the sampler's normalised one.
LATENT_CHANNELS = 16

PTH_NAME = "TransparentVAE.pth"
SAFETENSORS_NAME = "TransparentVAE.safetensors"

# The file's groups: the prefixes of their tensors' names.
SD_VAE = "sd_vae"
ENCODER_GROUP = "encoder"
DECODER_GROUP = "decoder"

# Diffusers AutoencoderKL with the FLUX.1 configuration (no quant convs).
_VAE_CHANNELS = (128, 256, 512, 512)
_VAE_LAYERS_PER_BLOCK = 2


def decoder(operations=nn) -> UNet1024:
    """The transparent decoder of the Flux file (input latent: the raw 16-channel Flux latent)."""
    return UNet1024(latent_channels=LATENT_CHANNELS, operations=operations)


def encoder(operations=nn) -> LatentTransparencyOffsetEncoder:
    """The latent-offset encoder of the Flux file."""
    return LatentTransparencyOffsetEncoder(latent_channels=LATENT_CHANNELS, operations=operations)


def flux_vae_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the Flux VAE in diffusers AutoencoderKL naming (the file's `sd_vae.*`)."""
    layout: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cout: int, cin: int, k: int = 3) -> None:
        layout[f"{name}.weight"], layout[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name: str, c: int) -> None:
        layout[f"{name}.weight"], layout[f"{name}.bias"] = (c,), (c,)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cout, cin, 1)

    def mid_block(name: str, c: int) -> None:
        resnet(f"{name}.resnets.0", c, c)
        norm(f"{name}.attentions.0.group_norm", c)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            layout[f"{name}.attentions.0.{proj}.weight"], layout[f"{name}.attentions.0.{proj}.bias"] = (c, c), (c,)
        resnet(f"{name}.resnets.1", c, c)

    last = len(_VAE_CHANNELS) - 1
    conv("encoder.conv_in", _VAE_CHANNELS[0], 3)
    cin = _VAE_CHANNELS[0]
    for i, cout in enumerate(_VAE_CHANNELS):
        for j in range(_VAE_LAYERS_PER_BLOCK):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if i < last:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", cout, cout)
        cin = cout
    mid_block("encoder.mid_block", _VAE_CHANNELS[-1])
    norm("encoder.conv_norm_out", _VAE_CHANNELS[-1])
    conv("encoder.conv_out", 2 * LATENT_CHANNELS, _VAE_CHANNELS[-1])

    conv("decoder.conv_in", _VAE_CHANNELS[-1], LATENT_CHANNELS)
    mid_block("decoder.mid_block", _VAE_CHANNELS[-1])
    cin = _VAE_CHANNELS[-1]
    for i, cout in enumerate(reversed(_VAE_CHANNELS)):
        for j in range(_VAE_LAYERS_PER_BLOCK + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if i < last:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", cout, cout)
        cin = cout
    norm("decoder.conv_norm_out", _VAE_CHANNELS[0])
    conv("decoder.conv_out", 3, _VAE_CHANNELS[0])
    return layout


def file_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the whole TransparentVAE file, all three groups."""
    layout = {f"{SD_VAE}.{k}": shape for k, shape in flux_vae_layout().items()}
    for group, factory in ((ENCODER_GROUP, encoder), (DECODER_GROUP, decoder)):
        with torch.device("meta"):
            module = factory()
        layout.update({f"{group}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
    return layout


def check_layout(state_dict: Mapping[str, torch.Tensor], file_name: str,
                 expected: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Raise WeightFileError unless `state_dict` has exactly the keys and shapes of `expected`
    (by default: the whole TransparentVAE file)."""
    expected = file_layout() if expected is None else expected
    problems = layout_differences(expected, {k: tuple(v.shape) for k, v in state_dict.items()})
    if problems:
        raise WeightFileError(
            f"{file_name} does not have the layout of the LayerDiffuse-Flux TransparentVAE file: "
            + "; ".join(problems)
            + f". Use {PTH_NAME} from https://huggingface.co/RedAIGC/Flux-version-LayerDiffuse"
        )


def read_pth(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a pickled state dict, unpickled with torch's weights-only loader: plain
    containers and tensors load, anything else (a pickled module, code) is refused."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"{name}: no such file: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f" (it contains {refused.group(1)})" if refused else ""
        raise WeightFileError(
            f"{name} is not a plain state dict of tensors{what}; it was refused without running any of its "
            f"code. Use the official {PTH_NAME} from https://huggingface.co/RedAIGC/Flux-version-LayerDiffuse"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise WeightFileError(
            f"{name} is corrupt or incomplete ({str(error).splitlines()[0]}); delete {path} and download it again"
        ) from error
    if not isinstance(loaded, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in loaded.items()):
        raise WeightFileError(f"{name} holds a {type(loaded).__name__}, not a state dict of named tensors")
    return dict(loaded)


def convert_pth(pth_path: str, safetensors_path: str) -> str:
    """Convert the port's TransparentVAE.pth into a safetensors file with the same tensors
    (same names, same dtypes) after a strict layout check. The target is written under a
    temporary name and renamed when complete. Returns `safetensors_path`."""
    from safetensors.torch import save_file

    state = read_pth(pth_path)
    check_layout(state, os.path.basename(pth_path))
    with atomic_write(safetensors_path) as partial:
        # clone: tensors from one pickle may share storage, which safetensors refuses.
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, partial)
    return safetensors_path


def main(argv: list[str]) -> int:
    """python -m lib_layerdiffuse.flux_vae TransparentVAE.pth [TransparentVAE.safetensors]"""
    if len(argv) not in (1, 2):
        print(f"usage: python -m lib_layerdiffuse.flux_vae {PTH_NAME} [{SAFETENSORS_NAME}]", file=sys.stderr)
        return 2
    source = argv[0]
    target = argv[1] if len(argv) == 2 else os.path.join(os.path.dirname(os.path.abspath(source)), SAFETENSORS_NAME)
    try:
        convert_pth(source, target)
    except WeightFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
