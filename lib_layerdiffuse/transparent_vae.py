"""Transparent decode and encode around an ordinary VAE, one code path for every family
(`vae_family.SD`, `vae_family.FLUX`), inputs checked here once.

Decode: the transparent decoder runs on the VAE-decoded RGB and the latent, under 8 flips and
rotations whose clipped outputs are median-merged per pixel (the reference's test-time
augmentation). Encode: the offset encoder's output scales the VAE posterior's std and is added to
its mean, so the latent carries the image's alpha.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .errors import InputError
from .finite import DECODER_CURE, LATENT_CURE, VAE_CURE, require_finite
from .offset_encoder import SIZE_MULTIPLE as ENCODER_SIZE_MULTIPLE
from .offset_encoder import LatentTransparencyOffsetEncoder
from .unet1024 import SIZE_MULTIPLE, UNet1024
from .unet1024_cpu import CpuExecutor
from .vae_family import TransparentVAEFamily

# (flip width, quarter turns) in the reference's order; the median does not depend on it.
AUGMENTATIONS = tuple((flip, turns) for flip in (False, True) for turns in range(4))
# Faster, less robust subsets: the 4 that keep the image's orientation, and the plain pass.
PASS_SETS = {8: AUGMENTATIONS, 4: ((False, 0), (False, 2), (True, 0), (True, 2)), 1: ((False, 0),)}
LATENT_SCALE = 8


def _transform(x: torch.Tensor, flip: bool, turns: int) -> torch.Tensor:
    if flip:
        x = torch.flip(x, dims=(3,))
    return torch.rot90(x, k=turns, dims=(2, 3))


def _untransform(x: torch.Tensor, flip: bool, turns: int) -> torch.Tensor:
    x = torch.rot90(x, k=-turns, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if flip else x


@torch.inference_mode()
def decode_augmented_passes(
    model: UNet1024, pixel: torch.Tensor, latent: torch.Tensor, on_pass: Optional[Callable[[], None]] = None,
    passes: int = 8,
) -> torch.Tensor:
    """The clipped passes (8 by default, see PASS_SETS), each mapped back to the input
    orientation: [passes,B,4,H,W]. A pass that overflows (NaN, inf) is an error, not a clipped 0 or 1."""
    augmentations = PASS_SETS[passes]
    n, _, h, w = pixel.shape
    outputs = torch.empty(len(augmentations), n, model.conv_out.out_channels, h, w, device=pixel.device)
    # On the CPU the executor runs the network (its storages serve this decode's passes).
    network = CpuExecutor(model) if pixel.device.type == "cpu" else model
    for i, (flip, turns) in enumerate(augmentations):
        p, z = (_transform(t, flip, turns).contiguous(memory_format=torch.channels_last) for t in (pixel, latent))
        raw = network(p, z)
        require_finite(raw, "the transparent decoder", "its output", DECODER_CURE)
        # the median in float32 also for a half-precision network
        outputs[i] = _untransform(raw.clamp_(0, 1), flip, turns)
        if on_pass is not None:
            on_pass()
    return outputs


def decode_augmented(
    model: UNet1024, pixel: torch.Tensor, latent: torch.Tensor, on_pass: Optional[Callable[[], None]] = None,
    passes: int = 8,
) -> torch.Tensor:
    """Per-pixel median of the passes ([B,4,H,W] in [0,1]). torch.median takes the lower of
    the two middle values, as the reference does."""
    return decode_augmented_passes(model, pixel, latent, on_pass, passes).median(dim=0).values


def check_latent(family: TransparentVAEFamily, latent: torch.Tensor, node: str) -> None:
    """Raise InputError, naming the node and what to connect, unless `latent` is a non-empty, finite
    latent batch [B,C,h,w] of the family."""
    if latent.dim() != 4:
        raise InputError(f"{node}: samples has shape {list(latent.shape)}, not a latent batch [B,C,h,w]; connect "
                         "a KSampler's LATENT")
    if latent.shape[0] == 0:
        raise InputError(f"{node}: samples is an empty batch; connect a latent of at least one image")
    if latent.shape[1] != family.latent_channels:
        raise InputError(
            f"{node}: the latent has {latent.shape[1]} channels but the {family.name} transparent decoder takes "
            f"{family.latent_channels}: connect the latent of a {family.name} model (SD1.5/SDXL latents have 4 "
            "channels and go to Layer Diffuse Decode, Flux latents have 16 and go to Layer Diffuse Flux Decode)"
        )
    require_finite(latent, node, "samples", LATENT_CURE)


def check_pixels(pixel: torch.Tensor, latent: torch.Tensor, node: str) -> None:
    """Raise InputError, naming the node and what to connect, unless `pixel` [B,3,H,W] is the
    finite VAE decode of the (checked) `latent`."""
    if pixel.dim() != 4 or pixel.shape[1] != 3:
        channels = pixel.shape[1] if pixel.dim() == 4 else "?"
        raise InputError(
            f"{node}: images has {channels} channels (shape [B,C,H,W] {list(pixel.shape)}); the transparent decoder "
            "takes the RGB image that VAE Decode made from these same latents, not an RGBA image (such as a "
            "Decode (RGBA) output or Qwen-Image's VAE output)"
        )
    if pixel.shape[0] != latent.shape[0]:
        raise InputError(
            f"{node}: batch mismatch: {pixel.shape[0]} images but {latent.shape[0]} latents; connect the images "
            "that VAE Decode made from these same latents"
        )
    h, w = pixel.shape[-2:]
    lh, lw = latent.shape[-2:]
    if (lh * LATENT_SCALE, lw * LATENT_SCALE) != (h, w):
        raise InputError(
            f"{node}: size mismatch: the images are {w}x{h} but the latent is {lw}x{lh} (x8 = {lw * 8}x{lh * 8}); "
            "connect the images that VAE Decode made from these same latents"
        )
    require_finite(pixel, node, "images (the VAE-decoded latent)", VAE_CURE)


def _pad_to_multiple(pixel: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replicate-pad bottom/right so both sides are multiples of the decoder's SIZE_MULTIPLE."""
    h, w = pixel.shape[-2:]
    pad_h, pad_w = -h % SIZE_MULTIPLE, -w % SIZE_MULTIPLE
    if pad_h == 0 and pad_w == 0:
        return pixel, latent
    pixel = F.pad(pixel, (0, pad_w, 0, pad_h), mode="replicate")
    latent = F.pad(latent, (0, pad_w // LATENT_SCALE, 0, pad_h // LATENT_SCALE), mode="replicate")
    return pixel, latent


def decode_transparent(
    family: TransparentVAEFamily,
    model: UNet1024,
    pixel: torch.Tensor,
    latent: torch.Tensor,
    sub_batch_size: int,
    on_pass: Optional[Callable[[], None]] = None,
    passes: int = 8,
) -> torch.Tensor:
    """Augmented transparent decode of any size that is a multiple of 8.

    pixel [B,3,H,W] in [0,1] and latent [B,C,H/8,W/8] as check_latent and check_pixels accept
    them, on any device: each sub-batch moves to the model's device. Returns R,G,B,A [B,4,H,W]
    float32 on pixel's device. `on_pass` is called after every network pass (`passes` per
    sub-batch). The network's own dtype (see UNet1024.compute_dtype) sets the precision.
    """
    weight = model.conv_in.weight
    h, w = pixel.shape[-2:]
    step = max(1, sub_batch_size)
    outputs = []
    for start in range(0, pixel.shape[0], step):
        p, z = (t[start : start + step].to(device=weight.device, dtype=weight.dtype) for t in (pixel, latent))
        p, z = _pad_to_multiple(p, z)
        decoded = decode_augmented(model, p, z, on_pass, passes)
        outputs.append(decoded[..., :h, :w].to(pixel.device, torch.float32))
    return family.to_rgba(torch.cat(outputs))


def sub_batches(batch: int, sub_batch_size: int) -> int:
    """How many sub-batches `decode_transparent` splits a batch into."""
    return -(-batch // max(1, sub_batch_size))


def latent_with_offset(mean: torch.Tensor, std: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The transparent latent: the posterior mean moved by `offset` standard deviations."""
    return mean + std * offset.to(mean)


def posterior_mean_std(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a VAE encoder's [B,2C,h,w] moments into the posterior mean and std, as
    DiagonalGaussianDistribution does (log-variance clamped to [-30, 20])."""
    mean, logvar = moments.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


@torch.no_grad()
def transparency_offset(
    family: TransparentVAEFamily, encoder: LatentTransparencyOffsetEncoder, rgb: torch.Tensor, alpha: torch.Tensor,
) -> torch.Tensor:
    """The latent offset for an RGBA image, in posterior std units: rgb [B,3,H,W], alpha [B,1,H,W]
    in [0,1], H and W multiples of 8 -> [B,C,H/8,W/8] float32 on rgb's device (computed on the
    encoder's)."""
    h, w = rgb.shape[-2:]
    if h % ENCODER_SIZE_MULTIPLE or w % ENCODER_SIZE_MULTIPLE:
        raise InputError(f"the image is {w}x{h}; transparent encoding needs sides that are multiples of 8")
    weight = encoder.blocks[0].weight
    offset = encoder(family.feed(rgb, alpha).to(device=weight.device, dtype=weight.dtype))
    return offset.to(rgb.device, torch.float32) * family.offset_scale
