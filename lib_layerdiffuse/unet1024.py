"""The transparent decoder network (the paper's "latent transparency decoder").

A UNet over the VAE-decoded RGB image, with the diffusion latent injected at 1/8 resolution,
that predicts (alpha, R, G, B). Parameter names follow the official
`vae_transparent_decoder.safetensors` exactly, so the released files load with strict=True.
This is the network as it reads; `unet1024_cpu` runs the same network faster on the CPU.

Like ComfyUI's own models, the networks take their layer classes as `operations` (a namespace
with Conv2d, Linear, GroupNorm): `torch.nn` by default; the host passes its own, which subclass
torch's and add its weight casting and offloading.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_CHANNELS = (32, 32, 64, 128, 256, 512, 512)
ATTENTION_BLOCKS = 3  # the last three down blocks and the first three up blocks attend
LATENT_INJECTION_BLOCK = 3  # the latent is added before down block 3, at 1/8 resolution
GROUPS = 4
EPS = 1e-5
HEAD_DIM = 8

# Six stride-2 stages: an image side must be a multiple of this.
SIZE_MULTIPLE = 2 ** (len(BLOCK_CHANNELS) - 1)


def _norm(channels: int, operations) -> nn.GroupNorm:
    return operations.GroupNorm(GROUPS, channels, eps=EPS)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, operations=nn):
        super().__init__()
        self.norm1 = _norm(in_channels, operations)
        self.conv1 = operations.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, operations)
        self.conv2 = operations.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = operations.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """Self attention over all pixels (heads of HEAD_DIM channels), with a residual connection."""

    def __init__(self, channels: int, operations=nn):
        super().__init__()
        self.heads = channels // HEAD_DIM
        self.group_norm = _norm(channels, operations)
        self.to_q = operations.Linear(channels, channels)
        self.to_k = operations.Linear(channels, channels)
        self.to_v = operations.Linear(channels, channels)
        self.to_out = nn.ModuleList([operations.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attend(self.group_norm(x))

    def attend(self, normalised: torch.Tensor) -> torch.Tensor:
        """The attention branch on the normalised map [B,C,H,W] (without the residual)."""
        b, c, h, w = normalised.shape
        tokens = normalised.flatten(2).transpose(1, 2)  # [B, HW, C]

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, HEAD_DIM).transpose(1, 2)

        q, k, v = (split_heads(proj(tokens)) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.to_out[0](out.transpose(1, 2).reshape(b, h * w, c))
        return out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int, operations=nn):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, operations=nn):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, attend: bool, downsample: bool, operations=nn):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels, out_channels, operations),
                                      ResnetBlock(out_channels, out_channels, operations)])
        self.attentions = (nn.ModuleList([SpatialSelfAttention(out_channels, operations) for _ in self.resnets])
                           if attend else None)
        self.downsamplers = nn.ModuleList([Downsample(out_channels, operations)]) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    def __init__(self, skip_channels: list[int], in_channels: int, out_channels: int, attend: bool, upsample: bool,
                 operations=nn):
        super().__init__()
        resnet_inputs = [in_channels] + [out_channels] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin + skip, out_channels, operations) for cin, skip in zip(resnet_inputs, skip_channels)]
        )
        self.attentions = (nn.ModuleList([SpatialSelfAttention(out_channels, operations) for _ in self.resnets])
                           if attend else None)
        self.upsamplers = nn.ModuleList([Upsample(out_channels, operations)]) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1))
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, operations=nn):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, operations),
                                      ResnetBlock(channels, channels, operations)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, operations)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class UNet1024(nn.Module):
    """Transparent decoder: (pixel [B,3,H,W] in [0,1], latent [B,C,H/8,W/8]) -> [B,4,H,W].

    H and W must be multiples of SIZE_MULTIPLE. Output channel 0 is alpha for the SD/SDXL files;
    the output has the body's dtype (`compute_dtype`).
    `latent_channels` is 4 for SD1.5/SDXL and 16 for the Flux port.
    """

    # In a half-precision network the input convolutions stay float32 (build_model keeps them):
    # rounding the image and the latent themselves would be the largest single error.
    FLOAT32_MODULES = ("conv_in", "latent_conv_in")

    def __init__(self, latent_channels: int = 4, in_channels: int = 3, out_channels: int = 4, operations=nn):
        super().__init__()
        ch = BLOCK_CHANNELS
        n = len(ch)
        self.conv_in = operations.Conv2d(in_channels, ch[0], 3, padding=1)
        self.latent_conv_in = operations.Conv2d(latent_channels, ch[LATENT_INJECTION_BLOCK - 1], 1)

        self.down_blocks = nn.ModuleList()
        skip_channels = [ch[0]]
        for i in range(n):
            last = i == n - 1
            self.down_blocks.append(DownBlock(ch[max(i - 1, 0)], ch[i], attend=i >= n - ATTENTION_BLOCKS,
                                              downsample=not last, operations=operations))
            skip_channels += [ch[i]] * (2 if last else 3)

        self.mid_block = MidBlock(ch[-1], operations)

        self.up_blocks = nn.ModuleList()
        previous = ch[-1]
        for i, out_channels_i in enumerate(reversed(ch)):
            block_skips = [skip_channels.pop() for _ in range(3)]
            self.up_blocks.append(
                UpBlock(block_skips, previous, out_channels_i, attend=i < ATTENTION_BLOCKS, upsample=i < n - 1,
                        operations=operations)
            )
            previous = out_channels_i

        self.conv_norm_out = _norm(ch[0], operations)
        self.conv_out = operations.Conv2d(ch[0], out_channels, 3, padding=1)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the network body computes in: its weights' (the input convs may differ)."""
        return self.conv_out.weight.dtype

    def embed_inputs(self, pixel: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image's features and the latent's (to be added before LATENT_INJECTION_BLOCK), each
        from its input convolution in that convolution's dtype, then in the body's."""
        x = self.conv_in(pixel.to(self.conv_in.weight.dtype)).to(self.compute_dtype)
        injected = self.latent_conv_in(latent.to(self.latent_conv_in.weight.dtype)).to(self.compute_dtype)
        return x, injected

    def forward(self, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        x, injected = self.embed_inputs(pixel, latent)
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            if i == LATENT_INJECTION_BLOCK:
                x = x + injected
            x, block_skips = block(x)
            skips += block_skips
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x, skips)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
