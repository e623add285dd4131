"""The transparent decoder (`unet1024.UNet1024`) run fast on the CPU, with the same output.

`CpuExecutor(model)(pixel, latent)` computes `model(pixel, latent)` from the model's own modules
and parameters, differently:

- the largest intermediates go into a few storages reused across the passes of one decode
  (STORAGE_OF: which, and why each reuse is safe). glibc gives every freed block of 32 MiB or
  more back to the kernel, so a map allocated afresh on every pass is faulted in again, page by
  page, every time;
- convolutions write or add their result straight into an existing tensor (oneDNN's fused sum):
  no memory of their own, no separate residual addition;
- nearest-2x upsampling then a 3x3 convolution is computed as four 2x2 convolutions of the
  low-resolution map, one per output phase (2.25x fewer FLOPs; the upsampled input is never
  built);
- GroupNorm statistics stay precise on large float32 channels-last maps, where torch's kernel
  drifts.

The executor knows one network: `check_structure` refuses any other, and the tests compare it
with the plain network.
"""
from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LayerDiffuseError
from .unet1024 import (ATTENTION_BLOCKS, BLOCK_CHANNELS, HEAD_DIM, LATENT_INJECTION_BLOCK, DownBlock, Downsample,
                       MidBlock, ResnetBlock, SpatialSelfAttention, UNet1024, UpBlock, Upsample)

Shape = tuple[int, int, int, int]

# --- the memory plan -------------------------------------------------------------------------------

# Where each large intermediate is written (site -> storage kind). Every other tensor (the skips,
# the attention outputs, the down path's resnet outputs, the output) has memory of its own.
# A storage is written again only once what it held is dead:
STORAGE_OF = {
    # A GroupNorm's output (then SiLU in place). Dead once the convolution or the attention
    # projections right after the norm have read it, before anything else writes "transient"
    # (the next norm or upsampling).
    "normalised": "transient",
    # An upsampled map. Dead once the concatenation that starts the next up block has copied it,
    # before that block's first norm writes "transient". (Upsampling only in an up block that
    # another up block follows: check_structure.)
    "upsampled": "transient",
    # An up block's concatenation of its input and a skip. What "concat" held before (a hidden
    # map, upsampling phases) is dead: see below.
    "concat": "concat",
    # A resnet's first convolution. In the down path and the mid block nothing else lives in
    # "concat"; in an up block it holds this resnet's input concatenation, dead once the
    # shortcut and norm1 have read it, which both happen before conv1 writes.
    "hidden": "concat",
    # The four phases of an upsampling convolution. The last hidden map is dead once its norm2
    # has read it; the phases are dead once interleaved into "upsampled".
    "phases": "concat",
    # An up block's resnet output (its shortcut, then conv2 added in). Dead once the
    # concatenation, attention, upsampling or final norm after it has read it; the next writer
    # is the next up resnet's shortcut, which reads the concatenation that copied it.
    "up_resnet": "residual",
}


class Storages:
    """The flat storages that the passes of one decode reuse, one per kind in STORAGE_OF."""

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def view(self, site: Optional[str], shape: Shape, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised channels-last [N,C,H,W] tensor of `like`'s dtype and device: a view of
        the storage for `site`'s kind (grown when too small), or new memory when `site` is None."""
        n, c, h, w = shape
        if site is None:
            return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)
        kind = STORAGE_OF[site]
        flat = self._flat.get(kind)
        if flat is None or flat.numel() < n * c * h * w or flat.dtype != like.dtype or flat.device != like.device:
            flat = self._flat[kind] = torch.empty(n * c * h * w, dtype=like.dtype, device=like.device)
        return flat[: n * c * h * w].view(n, h, w, c).permute(0, 3, 1, 2)


# --- convolutions that write into existing memory ------------------------------------------------

@functools.cache
def fused_sum_dtypes() -> frozenset[torch.dtype]:
    """Dtypes whose CPU convolutions oneDNN can add straight into an existing tensor (asked on
    first use, then remembered)."""
    try:
        mkldnn = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available() or not hasattr(mkldnn, "_convolution_pointwise_"):
            return frozenset()
        return frozenset([torch.float32]
                         + [torch.bfloat16] * mkldnn._is_mkldnn_bf16_supported()
                         + [torch.float16] * mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return frozenset()


def _sums_in_place(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in fused_sum_dtypes() and x.dtype == weight.dtype
            and x.is_contiguous(memory_format=torch.channels_last))


def _conv_sum_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               padding: int) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        out, x, weight, bias, padding=[padding, padding], stride=[1, 1], dilation=[1, 1], groups=1,
        binary_attr="add", alpha=1.0, unary_attr=None, unary_scalars=[], unary_algorithm=None)


def conv_add_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              padding: int) -> torch.Tensor:
    """out += conv2d(x, weight, bias, padding=padding) (stride 1), in place; returns `out`. oneDNN
    adds as the convolution's epilogue where it can: no memory for the convolution's own result,
    no separate addition pass."""
    if _sums_in_place(x, weight) and out.dtype == x.dtype and out.is_contiguous(memory_format=torch.channels_last):
        return _conv_sum_(out, x, weight, bias, padding)
    return out.add_(F.conv2d(x, weight, bias, padding=padding))


def conv_into(storages: Storages, site: Optional[str], x: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=padding) (stride 1). Where oneDNN can sum in place it is
    written into the storage for `site` (see Storages.view); otherwise it is a new tensor."""
    if not _sums_in_place(x, weight):
        return F.conv2d(x, weight, bias, padding=padding)
    n, _, h, w = x.shape
    grow = 2 * padding - weight.shape[-1] + 1
    out = storages.view(site, (n, weight.shape[0], h + grow, w + grow), x)
    return _conv_sum_(out.zero_(), x, weight, bias, padding)


# --- GroupNorm with precise statistics --------------------------------------------------------------

# From this many pixels up a float32 channels-last map is normalised from statistics computed
# here (see precise_group_norm); below it torch's own kernel is both fast and precise.
PRECISE_NORM_PIXELS = 512 * 512


def precise_group_norm(norm: nn.GroupNorm, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """norm(x) into `out`, for a channels-last x with affine parameters.

    On the CPU, torch's channels-last float32 kernel accumulates a whole group's statistics in
    float32, so on a 1024x1024 map its output drifts by about 1e-4 from a float64 computation
    (NCHW: 1e-7), and the decoder's output with it. Here the per-channel sums come from a blocked
    reduction and the sums of squares from the diagonal of a Gram matrix (a GEMM, blocked
    accumulation), and the normalisation is one multiply-add per element.
    """
    n, c, h, w = x.shape
    groups = norm.num_groups
    pixels = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view of the channels-last memory
    sums = pixels.sum(1)
    squares = torch.bmm(pixels.transpose(1, 2), pixels).diagonal(dim1=1, dim2=2)
    count = h * w * (c // groups)
    mean = sums.view(n, groups, -1).sum(-1, keepdim=True) / count
    var = (squares.view(n, groups, -1).sum(-1, keepdim=True) / count - mean * mean).clamp_(min=0)
    scale = norm.weight.view(groups, -1) * (var + norm.eps).rsqrt()
    shift = norm.bias.view(groups, -1) - mean * scale
    return torch.addcmul(shift.view(n, c, 1, 1), x, scale.view(n, c, 1, 1), out=out)


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, storages: Storages) -> torch.Tensor:
    """norm(x): precise_group_norm into the "normalised" storage on large float32 channels-last
    maps, torch's kernel (new memory) elsewhere."""
    _, _, h, w = x.shape
    if (x.dtype != torch.float32 or h * w < PRECISE_NORM_PIXELS
            or not x.is_contiguous(memory_format=torch.channels_last)):
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return precise_group_norm(norm, x, storages.view("normalised", x.shape, x))


# --- sub-pixel upsampling ---------------------------------------------------------------------------

def _fold_taps(w: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
    """The 3 taps of a 3x3 kernel along `dim`, folded to the 2 that one phase of a nearest 2x
    upsampling sees: phase 0 reads the previous and the current source pixel (taps 0 | 1+2),
    phase 1 the current and the next (taps 0+1 | 2)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t0, t1 + t2] if phase == 0 else [t0 + t1, t2], dim)


def subpixel_weight(w: torch.Tensor) -> torch.Tensor:
    """[O,I,3,3] -> [4O,I,2,2]: a 3x3 convolution of the nearest-2x-upsampled image, as one 2x2
    convolution of the image per output phase (row phase a, column phase b at 2a+b). Summed in
    at least float32, so that a half-precision kernel is rounded once."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    return torch.cat([_fold_taps(_fold_taps(w, 2, a), 3, b) for a in (0, 1) for b in (0, 1)])


# conv -> ((weight data_ptr, bias data_ptr, dtype, device), folded weight, repeated bias). Refolded
# when the weights change or move (ComfyUI moves the model between devices); an entry goes with
# its module.
_folded: weakref.WeakKeyDictionary[nn.Conv2d, tuple] = weakref.WeakKeyDictionary()


def subpixel_kernel(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded weight and the bias of `conv` for upsample(), made once per weight."""
    weight, bias = conv.weight, conv.bias
    source = (weight.data_ptr(), bias.data_ptr(), weight.dtype, weight.device)
    cached = _folded.get(conv)
    if cached is None or cached[0] != source:
        folded = subpixel_weight(weight).to(dtype=weight.dtype, memory_format=torch.channels_last)
        cached = _folded[conv] = (source, folded, bias.repeat(4))
    return cached[1], cached[2]


def upsample(conv: nn.Conv2d, x: torch.Tensor, storages: Storages) -> torch.Tensor:
    """conv(nearest 2x upsampling of x), for a 3x3 `conv` with padding 1, into the "upsampled"
    storage."""
    b, _, h, w = x.shape
    o = conv.out_channels
    weight, bias = subpixel_kernel(conv)
    # padding 1 on a 2x2 kernel: (h+1, w+1) windows; phase (a, c) is the window at offset (a, c)
    phases = conv_into(storages, "phases", x, weight, bias, 1)
    out = storages.view("upsampled", (b, o, 2 * h, 2 * w), phases)
    for i, (a, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, a::2, c::2] = phases[:, i * o:(i + 1) * o, a:a + h, c:c + w]
    return out


# --- the network this executor knows -----------------------------------------------------------------

class UnknownNetworkError(LayerDiffuseError):
    """The network is not the one unet1024_cpu was written for (a changed decoder module)."""


DOWN_RESNETS = 2  # per down block
UP_RESNETS = 3  # per up block: one per skip its down block left (two resnets, then the sampler)


# The layers the executor computes from their weight and bias. The network's `operations` may
# supply subclasses (ComfyUI's layers, which cast weights in their forward): the executor reads
# the weights as stored, the dtype build_model gave them, so the host's layers cast nothing here.
LAYERS = (nn.Conv2d, nn.GroupNorm, nn.Linear)


def check_structure(model: nn.Module) -> None:
    """Raise UnknownNetworkError unless `model` is the UNet1024 that CpuExecutor runs: these
    module types exactly (no subclass, nothing added; the LAYERS or subclasses of them),
    BLOCK_CHANNELS down blocks of
    DOWN_RESNETS resnets, attention in the last ATTENTION_BLOCKS, downsampling in all but the
    last; resnet-attention-resnet in the middle; mirrored up blocks of UP_RESNETS resnets on the
    skips, upsampling in all but the last; the latent joining before down block
    LATENT_INJECTION_BLOCK; convolutions, norms and projections of these channels and shapes."""
    checked: set[int] = set()

    def expect(condition: bool, where: str, what: str) -> None:
        if not condition:
            raise UnknownNetworkError(
                f"the transparent decoder's {where} is not {what}: lib_layerdiffuse/unet1024_cpu.py runs only the "
                "network it was written for; change it with the network (or run the network itself)")

    def module(m: object, where: str, kind: type) -> None:
        own = [name for name, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]]
        if kind in LAYERS:
            expect(isinstance(m, kind) and set(own) <= {"weight", "bias"}, where,
                   f"a {kind.__name__} holding only its weight and bias (found {type(m).__name__} with {own})")
        else:
            expect(type(m) is kind, where, f"a {kind.__name__} (found {type(m).__name__})")
            expect(not own, where, f"a {kind.__name__} without tensors of its own (found {own})")
        checked.add(id(m))

    def listed(m: object, where: str, kind: type, count: int) -> list:
        module(m, where, nn.ModuleList)
        expect(len(m) == count, where, f"a list of {count} {kind.__name__} (found {len(m)})")
        for i, child in enumerate(m):
            module(child, f"{where}.{i}", kind)
        return list(m)

    def conv(m: nn.Conv2d, where: str, cin: Optional[int], cout: Optional[int], kernel: int, stride: int = 1) -> None:
        module(m, where, nn.Conv2d)
        found = (m.in_channels if cin is not None else None, m.out_channels if cout is not None else None,
                 m.kernel_size, m.stride, m.padding, m.dilation, m.groups, m.padding_mode, m.bias is not None)
        wanted = (cin, cout, (kernel, kernel), (stride, stride), (kernel // 2, kernel // 2), (1, 1), 1, "zeros", True)
        expect(found == wanted, where, f"a {kernel}x{kernel} convolution {cin or ''}->{cout or ''} with bias, stride "
               f"{stride}, padding {kernel // 2}")

    def norm(m: nn.GroupNorm, where: str, channels: int) -> None:
        module(m, where, nn.GroupNorm)
        expect(m.num_channels == channels and m.affine, where, f"an affine GroupNorm of {channels} channels")

    def linear(m: nn.Linear, where: str, channels: int) -> None:
        module(m, where, nn.Linear)
        expect((m.in_features, m.out_features, m.bias is not None) == (channels, channels, True), where,
               f"a {channels}->{channels} projection with bias")

    def resnet(m: ResnetBlock, where: str, cin: int, cout: int) -> None:
        module(m, where, ResnetBlock)
        norm(m.norm1, f"{where}.norm1", cin)
        conv(m.conv1, f"{where}.conv1", cin, cout, 3)
        norm(m.norm2, f"{where}.norm2", cout)
        conv(m.conv2, f"{where}.conv2", cout, cout, 3)
        if cin == cout:
            expect(m.conv_shortcut is None, f"{where}.conv_shortcut", "absent")
        else:
            conv(m.conv_shortcut, f"{where}.conv_shortcut", cin, cout, 1)

    def attention(m: SpatialSelfAttention, where: str, channels: int) -> None:
        module(m, where, SpatialSelfAttention)
        expect(m.heads * HEAD_DIM == channels, where, f"attention with heads of {HEAD_DIM} channels")
        norm(m.group_norm, f"{where}.group_norm", channels)
        for name in ("to_q", "to_k", "to_v"):
            linear(getattr(m, name), f"{where}.{name}", channels)
        linear(listed(m.to_out, f"{where}.to_out", nn.Linear, 1)[0], f"{where}.to_out.0", channels)

    def resnets_and_attentions(block: nn.Module, where: str, channels: list[tuple[int, int]], attend: bool) -> None:
        for i, (r, (cin, cout)) in enumerate(zip(listed(block.resnets, f"{where}.resnets", ResnetBlock, len(channels)),
                                                 channels)):
            resnet(r, f"{where}.resnets.{i}", cin, cout)
        expect((block.attentions is not None) == attend, where, "attending" if attend else "without attention")
        if attend:
            for i, a in enumerate(listed(block.attentions, f"{where}.attentions", SpatialSelfAttention, len(channels))):
                attention(a, f"{where}.attentions.{i}", channels[i][1])

    def sampler(m: Optional[nn.ModuleList], where: str, kind: type, channels: int, present: bool) -> None:
        expect((m is not None) == present, where, f"{'a' if present else 'no'} {kind.__name__}")
        if present:
            (s,) = listed(m, where, kind, 1)
            conv(s.conv, f"{where}.0.conv", channels, channels, 3, stride=2 if kind is Downsample else 1)

    ch, n = BLOCK_CHANNELS, len(BLOCK_CHANNELS)
    module(model, "network", UNet1024)
    conv(model.conv_in, "conv_in", None, ch[0], 3)
    conv(model.latent_conv_in, "latent_conv_in", None, ch[LATENT_INJECTION_BLOCK - 1], 1)
    skips = [ch[0]]
    for i, block in enumerate(listed(model.down_blocks, "down_blocks", DownBlock, n)):
        cin = ch[max(i - 1, 0)]
        resnets_and_attentions(block, f"down_blocks.{i}", [(cin, ch[i])] + [(ch[i], ch[i])] * (DOWN_RESNETS - 1),
                               attend=i >= n - ATTENTION_BLOCKS)
        sampler(block.downsamplers, f"down_blocks.{i}.downsamplers", Downsample, ch[i], present=i < n - 1)
        skips += [ch[i]] * (DOWN_RESNETS + (i < n - 1))
    module(model.mid_block, "mid_block", MidBlock)
    for i, r in enumerate(listed(model.mid_block.resnets, "mid_block.resnets", ResnetBlock, 2)):
        resnet(r, f"mid_block.resnets.{i}", ch[-1], ch[-1])
    attention(listed(model.mid_block.attentions, "mid_block.attentions", SpatialSelfAttention, 1)[0],
              "mid_block.attentions.0", ch[-1])
    previous = ch[-1]
    for i, block in enumerate(listed(model.up_blocks, "up_blocks", UpBlock, n)):
        cout = ch[n - 1 - i]
        channels = []
        for _ in range(UP_RESNETS):
            channels.append((previous + skips.pop(), cout))
            previous = cout
        resnets_and_attentions(block, f"up_blocks.{i}", channels, attend=i < ATTENTION_BLOCKS)
        sampler(block.upsamplers, f"up_blocks.{i}.upsamplers", Upsample, cout, present=i < n - 1)
    norm(model.conv_norm_out, "conv_norm_out", ch[0])
    conv(model.conv_out, "conv_out", ch[0], None, 3)
    unknown = [name for name, m in model.named_modules() if id(m) not in checked]
    expect(not unknown, ", ".join(unknown), "a module the executor runs")


# --- the executor ------------------------------------------------------------------------------------

class CpuExecutor:
    """`executor(pixel, latent)` is `model(pixel, latent)` for a UNet1024 on the CPU, faster.

    The storages live as long as the executor and hold nothing a result refers to: make one per
    decode, run its passes through it, and they are freed with it."""

    def __init__(self, model: UNet1024) -> None:
        check_structure(model)
        self.model = model
        self.storages = Storages()

    @torch.inference_mode()
    def __call__(self, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        model = self.model
        x, injected = model.embed_inputs(*(t.contiguous(memory_format=torch.channels_last) for t in (pixel, latent)))
        skips = [x]
        for i, block in enumerate(model.down_blocks):
            if i == LATENT_INJECTION_BLOCK:
                x = x + injected
            for j, resnet in enumerate(block.resnets):
                x = self._resnet(resnet, x)
                if block.attentions is not None:
                    x = self._attention(block.attentions[j], x)
                skips.append(x)
            if block.downsamplers is not None:
                x = block.downsamplers[0](x)
                skips.append(x)
        mid = model.mid_block
        x = self._resnet(mid.resnets[1], self._attention(mid.attentions[0], self._resnet(mid.resnets[0], x)))
        for block in model.up_blocks:
            for j, resnet in enumerate(block.resnets):
                skip = skips.pop()
                n, c, h, w = x.shape
                x = torch.cat([x, skip], dim=1, out=self.storages.view("concat", (n, c + skip.shape[1], h, w), x))
                del skip  # copied into the concatenation: free it before the resnet runs
                x = self._resnet(resnet, x, out_site="up_resnet")
                if block.attentions is not None:
                    x = self._attention(block.attentions[j], x)
            if block.upsamplers is not None:
                x = upsample(block.upsamplers[0].conv, x, self.storages)
        return model.conv_out(F.silu(group_norm(model.conv_norm_out, x, self.storages), inplace=True))

    def _resnet(self, block: ResnetBlock, x: torch.Tensor, out_site: Optional[str] = None) -> torch.Tensor:
        n, _, h, w = x.shape
        if block.conv_shortcut is None:
            out = self.storages.view(out_site, (n, block.conv2.out_channels, h, w), x).copy_(x)
        else:
            out = conv_into(self.storages, out_site, x, block.conv_shortcut.weight, block.conv_shortcut.bias, 0)
        # SiLU in place: the normalised maps are the executor's own intermediates.
        normalised = F.silu(group_norm(block.norm1, x, self.storages), inplace=True)
        hidden = conv_into(self.storages, "hidden", normalised, block.conv1.weight, block.conv1.bias, 1)
        normalised = F.silu(group_norm(block.norm2, hidden, self.storages), inplace=True)
        return conv_add_(out, normalised, block.conv2.weight, block.conv2.bias, 1)

    def _attention(self, block: SpatialSelfAttention, x: torch.Tensor) -> torch.Tensor:
        return block.attend(group_norm(block.group_norm, x, self.storages)).add_(x)
