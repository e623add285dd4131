"""The transparent decoder network (the paper's "latent transparency decoder").

A UNet over the VAE-decoded RGB image, with the diffusion latent injected at 1/8 resolution,
that predicts (alpha, R, G, B). Parameter names follow the official
`vae_transparent_decoder.safetensors` exactly, so the released files load with strict=True.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional

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


# From this many pixels up a float32 channels-last map on the CPU is normalised from statistics
# computed here (see GroupNorm); below it torch's own kernel is both fast and precise.
PRECISE_NORM_PIXELS = 512 * 512

# kind -> flat storage, while reused_buffers() is active (see there).
_scratch_storage: ContextVar[Optional[dict]] = ContextVar("unet1024_scratch_storage", default=None)


@contextmanager
def reused_buffers() -> Iterator[None]:
    """Within this block the network writes its largest intermediates into storages kept across
    calls instead of fresh tensors, one storage per kind:

    - "transient": normalised maps and upsampled maps;
    - "concat": a skip concatenation, then (once its resnet has normalised it and taken its
      shortcut) that resnet's hidden map; and the phases of an upsampling convolution;
    - "residual": the output of an up block's resnet.

    Fresh memory would cost more than the copies this saves: glibc gives every freed block of
    32 MiB or more back to the kernel, so each pass would fault those maps' pages in again
    (about a fifth of a 1024x1024 float32 pass on this project's CPU). Safe because each
    storage's previous content is dead by the time it is written again: a normalised map is
    consumed by the convolution or projections right after it, an upsampled map by the
    concatenation that starts the next block (before its first norm), a hidden map by its
    resnet's norm, phases by their interleaving, a resnet output by the concatenation,
    attention or upsampling after it. Nothing made inside the block may be kept beyond the
    network's own output; the storages are freed when the block ends.
    """
    token = _scratch_storage.set({})
    try:
        yield
    finally:
        _scratch_storage.reset(token)


def _new(shape: tuple[int, int, int, int], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised channels-last [N,C,H,W] tensor of `like`'s dtype and device."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _scratch(kind: str, shape: tuple[int, int, int, int], like: torch.Tensor) -> torch.Tensor:
    """Like _new, but a view of the storage kept for `kind` inside reused_buffers() (grown when
    too small)."""
    storages = _scratch_storage.get()
    n, c, h, w = shape
    if storages is None:
        return _new(shape, like)
    storage = storages.get(kind)
    if storage is None or storage.numel() < n * c * h * w or storage.dtype != like.dtype or storage.device != like.device:
        storage = storages[kind] = torch.empty(n * c * h * w, dtype=like.dtype, device=like.device)
    return storage[: n * c * h * w].view(n, h, w, c).permute(0, 3, 1, 2)


def _fused_sum_dtypes() -> frozenset:
    """Dtypes whose CPU convolutions oneDNN can add straight into an existing tensor."""
    try:
        mkldnn = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available() or not hasattr(mkldnn, "_convolution_pointwise_"):
            return frozenset()
        return frozenset([torch.float32]
                         + [torch.bfloat16] * mkldnn._is_mkldnn_bf16_supported()
                         + [torch.float16] * mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return frozenset()


FUSED_SUM_DTYPES = _fused_sum_dtypes()


def _sums_in_place(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in FUSED_SUM_DTYPES and x.dtype == weight.dtype
            and x.is_contiguous(memory_format=torch.channels_last))


def _conv_sum_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               padding: int) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise_(
        out, x, weight, bias, [padding, padding], [1, 1], [1, 1], 1, "add", 1.0, None, [], None)


def conv_add_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              padding: int) -> torch.Tensor:
    """out += conv2d(x, weight, bias, padding=padding), in place; returns `out`. On the CPU
    oneDNN adds as the convolution's epilogue: no memory for the convolution's own result, no
    separate addition pass."""
    if (_sums_in_place(x, weight) and out.dtype == x.dtype
            and out.is_contiguous(memory_format=torch.channels_last)):
        return _conv_sum_(out, x, weight, bias, padding)
    return out.add_(F.conv2d(x, weight, bias, padding=padding))


def conv_into(kind: Optional[str], x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              padding: int) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=padding). On the CPU oneDNN writes it into the storage
    kept for `kind` (see reused_buffers; None: a new tensor), so that it takes no memory of its
    own; elsewhere it is a new tensor, which a GPU's caching allocator makes as cheap."""
    if not _sums_in_place(x, weight):
        return F.conv2d(x, weight, bias, padding=padding)
    n, _, h, w = x.shape
    grow = 2 * padding - weight.shape[-1] + 1
    shape = (n, weight.shape[0], h + grow, w + grow)
    out = _new(shape, x) if kind is None else _scratch(kind, shape, x)
    return _conv_sum_(out.zero_(), x, weight, bias, padding)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters) whose statistics stay precise on large channels-last maps.

    On the CPU, torch's channels-last float32 kernel accumulates a whole group's statistics in
    float32, so on a 1024x1024 map its output drifts by about 1e-4 from a float64 computation
    (NCHW: 1e-7), and the decoder's output with it. Here the per-channel sums come from a blocked
    reduction and the sums of squares from the diagonal of a Gram matrix (a GEMM, blocked
    accumulation), and the normalisation is one multiply-add per element: about as fast as
    torch's kernel on such maps, and within about 1e-6 of float64.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # CPU only: there torch's kernel drifts, and a GPU's GEMM may run in TF32.
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight is None
                or h * w < PRECISE_NORM_PIXELS or not x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        pixels = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view of the channels-last memory
        sums = pixels.sum(1)
        squares = torch.bmm(pixels.transpose(1, 2), pixels).diagonal(dim1=1, dim2=2)
        count = h * w * (c // self.num_groups)
        mean = sums.view(n, self.num_groups, -1).sum(-1, keepdim=True) / count
        var = (squares.view(n, self.num_groups, -1).sum(-1, keepdim=True) / count - mean * mean).clamp_(min=0)
        scale = self.weight.view(self.num_groups, -1) * (var + self.eps).rsqrt()
        shift = self.bias.view(self.num_groups, -1) - mean * scale
        return torch.addcmul(shift.view(n, c, 1, 1), x, scale.view(n, c, 1, 1), out=_scratch("transient", x.shape, x))


def _norm(channels: int) -> GroupNorm:
    return GroupNorm(GROUPS, channels, eps=EPS)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, into_buffer: bool = False) -> torch.Tensor:
        """`into_buffer`: the result goes into the reused "residual" buffer, which the caller
        must consume before the next resnet runs, instead of memory of its own (a skip)."""
        n, _, h, w = x.shape
        shape = (n, self.conv2.out_channels, h, w)
        if self.conv_shortcut is None:
            out = _scratch("residual", shape, x).copy_(x) if into_buffer else x.clone(memory_format=torch.channels_last)
        else:
            out = conv_into("residual" if into_buffer else None, x, self.conv_shortcut.weight, self.conv_shortcut.bias, 0)
        # SiLU in place: the normalised map is our own intermediate (inference only).
        normalised = F.silu(self.norm1(x), inplace=True)
        # x is consumed: when it is a concatenation, the hidden map takes its storage.
        hidden = conv_into("concat", normalised, self.conv1.weight, self.conv1.bias, 1)
        return conv_add_(out, F.silu(self.norm2(hidden), inplace=True), self.conv2.weight, self.conv2.bias, 1)


class SpatialSelfAttention(nn.Module):
    """Single-head-dim-8 self attention over all pixels, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.heads = channels // HEAD_DIM
        self.group_norm = _norm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # [B, HW, C]; a view, not a copy, when x is channels-last.
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, HEAD_DIM).transpose(1, 2)

        q, k, v = (split_heads(proj(tokens)) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.to_out[0](out.transpose(1, 2).reshape(b, h * w, c))
        return out.transpose(1, 2).reshape(b, c, h, w).add_(x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _fold_taps(w: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
    """The 3 taps of a 3x3 kernel along `dim`, folded to the 2 that one phase of a nearest 2x
    upsampling sees: phase 0 reads the previous and the current source pixel (taps 0 | 1+2),
    phase 1 the current and the next (taps 0+1 | 2)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t0, t1 + t2] if phase == 0 else [t0 + t1, t2], dim)


def subpixel_weight(w: torch.Tensor) -> torch.Tensor:
    """[O,I,3,3] -> [4O,I,2,2]: a 3x3 convolution of the nearest-2x-upsampled image, as one 2x2
    convolution of the image per output phase (row phase a, column phase b at 2a+b)."""
    w = w.float()
    phases = [_fold_taps(_fold_taps(w, 2, a), 3, b) for a in (0, 1) for b in (0, 1)]
    return torch.cat(phases)


class Upsample(nn.Module):
    """Nearest 2x upsampling and a 3x3 convolution, computed without building the upsampled
    image: 4 output phases x 2x2 taps instead of 9 taps on 4x the pixels (2.25x fewer FLOPs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        # The folded kernel, made from conv.weight on first use. A non-persistent buffer: out of
        # the state dict (the file's layout is unchanged), moved with the module when ComfyUI
        # loads or offloads it.
        self.register_buffer("phase_weight", None, persistent=False)
        self._folded_from = None

    def _phase_weight(self) -> torch.Tensor:
        weight = self.conv.weight
        source = (weight.data_ptr(), weight.dtype, weight.device)
        if self._folded_from != source:
            self.phase_weight = subpixel_weight(weight).to(dtype=weight.dtype, memory_format=torch.channels_last)
            self._folded_from = source
        return self.phase_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        o = self.conv.out_channels
        # padding 1 on a 2x2 kernel: (h+1, w+1) windows; phase (a, b) is the window at offset (a, b)
        phases = conv_into("concat", x, self._phase_weight(), self.conv.bias.repeat(4), 1)
        out = _scratch("transient", (b, o, 2 * h, 2 * w), phases)
        for i, (a, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            out[:, :, a::2, c::2] = phases[:, i * o:(i + 1) * o, a:a + h, c:c + w]
        return out


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, attend: bool, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels, out_channels), ResnetBlock(out_channels, out_channels)])
        if attend:
            self.attentions = nn.ModuleList([SpatialSelfAttention(out_channels) for _ in self.resnets])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    def __init__(self, skip_channels: list[int], in_channels: int, out_channels: int, attend: bool, upsample: bool):
        super().__init__()
        resnet_inputs = [in_channels] + [out_channels] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin + skip, out_channels) for cin, skip in zip(resnet_inputs, skip_channels)]
        )
        if attend:
            self.attentions = nn.ModuleList([SpatialSelfAttention(out_channels) for _ in self.resnets])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            skip = skips.pop()
            x = torch.cat([x, skip], dim=1, out=_scratch("concat", (x.shape[0], x.shape[1] + skip.shape[1], *x.shape[2:]), x))
            del skip  # copied into the concatenation: free it before the resnet runs
            x = resnet(x, into_buffer=True)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels), ResnetBlock(channels, channels)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels)])

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

    def __init__(self, latent_channels: int = 4, in_channels: int = 3, out_channels: int = 4):
        super().__init__()
        ch = BLOCK_CHANNELS
        n = len(ch)
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.latent_conv_in = nn.Conv2d(latent_channels, ch[LATENT_INJECTION_BLOCK - 1], 1)

        self.down_blocks = nn.ModuleList()
        skip_channels = [ch[0]]
        for i in range(n):
            last = i == n - 1
            self.down_blocks.append(DownBlock(ch[max(i - 1, 0)], ch[i], attend=i >= n - ATTENTION_BLOCKS, downsample=not last))
            skip_channels += [ch[i]] * (2 if last else 3)

        self.mid_block = MidBlock(ch[-1])

        self.up_blocks = nn.ModuleList()
        previous = ch[-1]
        for i, out_channels_i in enumerate(reversed(ch)):
            block_skips = [skip_channels.pop() for _ in range(3)]
            self.up_blocks.append(
                UpBlock(block_skips, previous, out_channels_i, attend=i < ATTENTION_BLOCKS, upsample=i < n - 1)
            )
            previous = out_channels_i

        self.conv_norm_out = _norm(ch[0])
        self.conv_out = nn.Conv2d(ch[0], out_channels, 3, padding=1)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the network body computes in: its weights' (the input convs may differ)."""
        return self.conv_out.weight.dtype

    def forward(self, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(pixel.to(self.conv_in.weight.dtype)).to(self.compute_dtype)
        injected = self.latent_conv_in(latent.to(self.latent_conv_in.weight.dtype)).to(self.compute_dtype)
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            if i == LATENT_INJECTION_BLOCK:
                x = x + injected
            x, block_skips = block(x)
            skips += block_skips
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x, skips)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))
