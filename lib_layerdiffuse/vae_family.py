"""What differs between the transparent VAE of SD1.5/SDXL and that of the Flux port, one record
each; everything else (the decode, the encode, the checks) is one code path in transparent_vae.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import flux_vae
from .offset_encoder import LatentTransparencyOffsetEncoder
from .rgba import pad_rgb
from .unet1024 import UNet1024

RGBA = "RGBA"


@dataclass(frozen=True)
class TransparentVAEFamily:
    name: str
    latent_channels: int
    decoder: Callable[..., UNet1024]
    encoder: Callable[..., LatentTransparencyOffsetEncoder]
    # The channel order of the offset encoder's input and of the decoder's output, as trained.
    encoder_feed: str
    decoder_output: str
    # How many posterior standard deviations one unit of the offset encoder's output is worth.
    offset_scale: float
    # The grey a transparent image is flattened on before the VAE encodes it.
    grey: float

    def feed(self, rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The offset encoder's input [B,4,H,W]: the padded colour and alpha in `encoder_feed` order."""
        padded = pad_rgb(rgb, alpha)
        channels = {"R": padded[:, 0:1], "G": padded[:, 1:2], "B": padded[:, 2:3], "A": alpha.float()}
        return torch.cat([channels[c] for c in self.encoder_feed], dim=1)

    def to_rgba(self, decoded: torch.Tensor) -> torch.Tensor:
        """The decoder's [B,4,H,W] output in R,G,B,A order."""
        if self.decoder_output == RGBA:
            return decoded
        return decoded[:, [self.decoder_output.index(c) for c in RGBA]]


SD = TransparentVAEFamily(
    name="SD1.5/SDXL", latent_channels=4, decoder=UNet1024, encoder=LatentTransparencyOffsetEncoder,
    encoder_feed="ARGB", decoder_output="ARGB", offset_scale=1.0,
    # the reference's 8-bit grey (127, 127, 127), not exactly 50%
    grey=127 / 255,
)
FLUX = TransparentVAEFamily(
    name="Flux", latent_channels=flux_vae.LATENT_CHANNELS, decoder=flux_vae.decoder, encoder=flux_vae.encoder,
    encoder_feed=RGBA, decoder_output=RGBA,
    offset_scale=300.0,  # the port's TransparentVAE.alpha
    grey=0.5,  # the port flattens on exactly 50% grey
)
