"""The latent-offset encoder: RGBA image -> the small latent offset that carries transparency.

Parameter names (`blocks.0` ... `blocks.16`) follow the official
`vae_transparent_encoder.safetensors`; the odd indices are the parameter-free SiLUs.
"""
from __future__ import annotations

import torch
from torch import nn

# (in, out, stride) of the nine convolutions; three stride-2 stages give the VAE's 1/8 scale.
_CONVS = ((4, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1))

SIZE_MULTIPLE = 8


class LatentTransparencyOffsetEncoder(nn.Module):
    """[B,4,H,W] feed in [0,1] -> [B,latent_channels,H/8,W/8] offset (H, W multiples of 8).

    The feed's channel order is the weight file's: (alpha, R, G, B) for SD1.5/SDXL.
    `operations`: the namespace of layer classes, as in unet1024.UNet1024.
    """

    def __init__(self, latent_channels: int = 4, operations=nn):
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout, stride in _CONVS:
            layers += [operations.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.SiLU()]
        layers.append(operations.Conv2d(_CONVS[-1][1], latent_channels, 3, padding=1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, feed: torch.Tensor) -> torch.Tensor:
        return self.blocks(feed)
