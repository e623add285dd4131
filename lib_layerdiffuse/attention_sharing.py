"""SD1.5 attention sharing: how LayerDiffuse makes one UNet draw several layers of one image.

The UNet sees a batch whose rows come in groups of `frames` (transparent fg: 1; fg/bg/blend: 3;
fg or bg + blend: 2), row `i` being frame `i % frames` of its group. Each of the 32 attention
modules of the SD1.5 UNet is replaced by a `SharedAttention`, which

1. optionally adds, per frame, features of a control image (the given fg or bg layer),
2. runs the original attention with a per-frame rank-256 LoRA on q/k/v/out (cross-attention
   may swap in a per-frame text context, on cond rows only),
3. lets the frames of one group attend to each other, token by token ("temporal" attention).

The learned tensors live in `AttentionSharingWeights`, whose state dict is exactly the layout of
the official `layer_sd15_*.safetensors` files (`hookers.layers.{i}.*`, `kwargs_encoder.*`).
Plain torch: the host supplies its attention function and the per-call sampling state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .errors import InputError, ModelError, WeightFileError

LORA_RANK = 256
CONTROL_CHANNELS = 256

# The attention modules of an SD1.5 UNet (LDM naming) in the order the official files number
# them: down path, up path, then the middle block; self-attention before cross-attention.
_SD15_TRANSFORMERS = (
    [f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)]
    + [f"output_blocks.{i}.1" for i in range(3, 12)]
    + ["middle_block.1"]
)
SD15_ATTENTION_MODULES: tuple[str, ...] = tuple(
    f"{block}.transformer_blocks.0.{attn}" for block in _SD15_TRANSFORMERS for attn in ("attn1", "attn2")
)


@dataclass(frozen=True)
class AttentionShape:
    """Feature sizes of one attention module: query input, key/value input, inner, output."""
    query_dim: int
    context_dim: int
    inner_dim: int
    out_dim: int
    heads: int


class FrameLoRA(nn.Module):
    """A low-rank offset `up @ down` added to a frozen projection's weight for one frame."""

    def __init__(self, in_features: int, out_features: int, rank: int = LORA_RANK):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def project(self, h: torch.Tensor, base: nn.Linear, strength: float) -> torch.Tensor:
        # Merge into the weight first (not base(h) + up(down(h))): that is the reference's order
        # of float operations, which keeps float32 results within 1e-6 of it.
        delta = torch.mm(self.up.weight.to(h), self.down.weight.to(h))
        if strength != 1.0:
            delta = delta * strength
        weight = base.weight.to(h) + delta
        bias = base.bias.to(h) if base.bias is not None else None
        return F.linear(h, weight, bias)


def _control_head(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(CONTROL_CHANNELS, CONTROL_CHANNELS, kernel_size=3, padding=1),
        nn.SiLU(),
        nn.Conv2d(CONTROL_CHANNELS, channels, kernel_size=1),
    )


class SharingWeights(nn.Module):
    """The learned tensors of one attention module (`hookers.layers.{i}` in the files)."""

    def __init__(self, shape: AttentionShape, frames: int, use_control: bool, rank: int = LORA_RANK):
        super().__init__()
        self.frames = frames

        def per_frame(in_features: int, out_features: int) -> nn.ModuleList:
            return nn.ModuleList(FrameLoRA(in_features, out_features, rank) for _ in range(frames))

        self.to_q_lora = per_frame(shape.query_dim, shape.inner_dim)
        self.to_k_lora = per_frame(shape.context_dim, shape.inner_dim)
        self.to_v_lora = per_frame(shape.context_dim, shape.inner_dim)
        self.to_out_lora = per_frame(shape.inner_dim, shape.out_dim)
        width = shape.inner_dim
        self.temporal_i = nn.Linear(width, width)
        self.temporal_n = nn.LayerNorm(width, eps=1e-6)
        self.temporal_q = nn.Linear(width, width)
        self.temporal_k = nn.Linear(width, width)
        self.temporal_v = nn.Linear(width, width)
        self.temporal_o = nn.Linear(width, width)
        self.control_convs = nn.ModuleList(_control_head(shape.out_dim) for _ in range(frames)) if use_control else None


def _encoder_stage(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=stride), nn.SiLU()]


class ControlImageEncoder(nn.Module):
    """Encodes the given layer (RGB in [-1, 1]) into 256-channel features at 1/8, 1/16, 1/32 and
    1/64 of its size: one per UNet resolution that has attention."""

    def __init__(self):
        super().__init__()
        widths = [(3, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1)]
        self.blocks_0 = nn.Sequential(*[m for w in widths for m in _encoder_stage(*w)])
        self.blocks_1 = nn.Sequential(*_encoder_stage(256, 256, 2), *_encoder_stage(256, 256, 1))
        self.blocks_2 = nn.Sequential(*_encoder_stage(256, 256, 2), *_encoder_stage(256, 256, 1))
        self.blocks_3 = nn.Sequential(*_encoder_stage(256, 256, 2), *_encoder_stage(256, 256, 1))

    def forward(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """image: [B, 3, H, W] in [-1, 1] -> {token count h*w: features [B, 256, h, w]}."""
        features = {}
        h = image
        for stage in (self.blocks_0, self.blocks_1, self.blocks_2, self.blocks_3):
            h = stage(h)
            features[h.shape[2] * h.shape[3]] = h
        return features


class _Layers(nn.Module):
    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class AttentionSharingWeights(nn.Module):
    """Everything an official `layer_sd15_*` file holds; its state dict is the file's layout."""

    def __init__(self, shapes: Sequence[AttentionShape], frames: int, use_control: bool, rank: int = LORA_RANK):
        super().__init__()
        self.frames = frames
        self.use_control = use_control
        self.hookers = _Layers([SharingWeights(s, frames, use_control, rank) for s in shapes])
        self.kwargs_encoder = ControlImageEncoder() if use_control else None

    @torch.no_grad()
    def encode_control(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """Control features for an IMAGE-style batch [B, H, W, 3] in [0, 1], in float32 on the
        encoder's device (the reference encodes in float32 whatever the UNet's dtype)."""
        if self.kwargs_encoder is None:
            raise WeightFileError("this attention-sharing file has no control-image encoder")
        param = next(self.kwargs_encoder.parameters())
        pixels = image[..., :3].movedim(-1, 1).to(device=param.device, dtype=torch.float32) * 2.0 - 1.0
        encoder = self.kwargs_encoder.float()
        return encoder(pixels)


def default_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on [B, tokens, heads * dim] tensors (used where no host supplies one)."""
    b, _, inner = q.shape
    dim = inner // heads
    q, k, v = (t.view(b, -1, heads, dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, inner)


Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, dict], torch.Tensor]


def _host_free_attention(q, k, v, heads, transformer_options):
    return default_attention(q, k, v, heads)


@dataclass
class SharingState:
    """What every `SharedAttention` of one patched model reads at call time.

    `attention(q, k, v, heads, transformer_options)` is the host's attention function.
    `active(transformer_options)` says whether the patch applies at this step (stop-at).
    `overwrites[f]` is a text context [1 or n, tokens, dim] for frame f's cond rows, or None.
    `control[tokens]` are control-image features [B_img, 256, h, w] (fg2bg / bg2fg only).
    """
    frames: int
    strength: float = 1.0
    attention: Attention = _host_free_attention
    active: Callable[[dict], bool] = lambda transformer_options: True
    overwrites: list = field(default_factory=list)
    control: Optional[dict] = None
    label: str = "LayerDiffuse attention sharing"
    _control_cache: dict = field(default_factory=dict, repr=False)

    def control_on(self, tokens: int, like: torch.Tensor) -> torch.Tensor:
        """The control features for `tokens`, converted once per device and dtype."""
        key = (tokens, like.device, like.dtype)
        if key not in self._control_cache:
            self._control_cache[key] = self.control[tokens].to(like)
        return self._control_cache[key]


class BatchSizeError(InputError):
    """The latent batch does not split into whole groups of frames."""


def cond_rows(transformer_options: dict, rows: int) -> Optional[torch.Tensor]:
    """Per row of the UNet batch: True where the row is a cond (not uncond) row, from ComfyUI's
    `cond_or_uncond` (0 = cond, 1 = uncond, one entry per equally sized chunk); None if unknown."""
    chunks = transformer_options.get("cond_or_uncond")
    if not chunks or rows % len(chunks):
        return None
    per_chunk = rows // len(chunks)
    return torch.tensor([c == 0 for c in chunks for _ in range(per_chunk)], dtype=torch.bool)


def _match_tokens(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat two contexts to a common token count (repeating every key leaves attention unchanged),
    as ComfyUI does when it batches prompts of different lengths."""
    if a.shape[1] == b.shape[1]:
        return a, b
    common = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, common // a.shape[1], 1), b.repeat(1, common // b.shape[1], 1)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = layer.bias.to(x) if layer.bias is not None else None
    return F.linear(x, layer.weight.to(x), bias)


def _layer_norm(layer: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, layer.normalized_shape, layer.weight.to(x), layer.bias.to(x), layer.eps)


class SharedAttention(nn.Module):
    """Stands in for one attention module of the UNet. It keeps the original's `to_q`, `to_k`,
    `to_v`, `to_out`, `heads` and `dim_head` (other patches and weight patches find them where
    they expect), and falls back to the original module when the patch is inactive."""

    def __init__(self, original: nn.Module, weights: SharingWeights, state: SharingState, cross_attention: bool):
        super().__init__()
        self.to_q = original.to_q
        self.to_k = original.to_k
        self.to_v = original.to_v
        self.to_out = original.to_out
        self.heads = original.heads
        self.dim_head = getattr(original, "dim_head", original.to_q.out_features // original.heads)
        self.attn_precision = getattr(original, "attn_precision", None)
        self.sharing = weights
        self.cross_attention = cross_attention
        self._original = [original]  # a list, so it is not a second registered copy of the weights
        self._state = state

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        state = self._state
        if state.strength == 0.0 or not state.active(transformer_options):
            return self.original(x, context=context, value=value, mask=mask, transformer_options=transformer_options)
        return self.shared_forward(x, context, value, transformer_options)

    def _framed(self, t: torch.Tensor) -> torch.Tensor:
        # rows (group, frame) -> [frame, group, tokens, channels]
        frames = self._state.frames
        return t.reshape(t.shape[0] // frames, frames, *t.shape[1:]).transpose(0, 1)

    def _check_batch(self, rows: int, transformer_options: dict) -> None:
        frames = self._state.frames
        chunks = len(transformer_options.get("cond_or_uncond") or [0])
        if rows % chunks == 0 and (rows // chunks) % frames == 0:
            return
        per_image = rows // chunks if rows % chunks == 0 else rows
        raise BatchSizeError(
            f"{self._state.label} works on groups of {frames} images (one per layer), so the latent "
            f"batch size must be a multiple of {frames}; got a batch of {per_image}. Set the Empty "
            f"Latent Image batch_size to {frames} (or {frames}N)."
        )

    def _control_features(self, tokens: int, groups: int, like: torch.Tensor, frame: int) -> torch.Tensor:
        signals = self._state.control
        if tokens not in signals:
            sizes = ", ".join(f"{s.shape[2]}x{s.shape[3]}" for s in signals.values())
            raise InputError(
                f"{self._state.label}: the control image does not match the latent size (its features are "
                f"{sizes}; the UNet has {tokens} tokens here). Resize the image to the generation size."
            )
        signal = self._state.control_on(tokens, like)
        if signal.shape[0] not in (1, groups):
            if groups % signal.shape[0]:
                raise BatchSizeError(
                    f"{self._state.label}: {signal.shape[0]} control images do not divide the {groups} image "
                    f"groups of this batch; give 1 image or one per generated image."
                )
            signal = signal.repeat(groups // signal.shape[0], 1, 1, 1)
        heads = self.sharing.control_convs[frame]
        out = heads(signal)
        return out.flatten(2).transpose(1, 2)

    @staticmethod
    def _overwrite_cond_rows(overwrite, ctx, val, cond, separate_value: bool):
        """Swap the text context of cond rows (never uncond rows) for this frame's own prompt."""
        new = overwrite.to(ctx)
        new_k, ctx = _match_tokens(new, ctx)
        rows = cond.to(ctx.device)[:, None, None]
        ctx = torch.where(rows, new_k, ctx)
        if not separate_value:
            return ctx, ctx
        new_v, val = _match_tokens(new, val)
        return ctx, torch.where(rows, new_v, val)

    def shared_forward(self, x: torch.Tensor, context, value, transformer_options: dict) -> torch.Tensor:
        state, w = self._state, self.sharing
        s = state.strength
        frames = state.frames
        self._check_batch(x.shape[0], transformer_options)
        hidden = self._framed(x)  # [F, G, tokens, C]
        groups, tokens = hidden.shape[1], hidden.shape[2]

        if w.control_convs is not None and state.control is not None:
            control = torch.stack([self._control_features(tokens, groups, hidden, f) for f in range(frames)])
            hidden = hidden + (control if s == 1.0 else control * s)

        cross = self.cross_attention and context is not None
        if cross:
            framed_context = self._framed(context)
            framed_value = self._framed(value) if value is not None else framed_context
        else:
            framed_context = framed_value = self._framed(context) if context is not None else hidden
        is_cond = cond_rows(transformer_options, x.shape[0])
        framed_cond = self._framed(is_cond) if is_cond is not None else None

        outs = []
        for f in range(frames):
            ctx, val = framed_context[f], framed_value[f]
            overwrite = state.overwrites[f] if cross and f < len(state.overwrites) else None
            if overwrite is not None and framed_cond is not None and bool(framed_cond[f].any()):
                ctx, val = self._overwrite_cond_rows(overwrite, ctx, val, framed_cond[f], value is not None)
            q = w.to_q_lora[f].project(hidden[f], self.to_q, s)
            k = w.to_k_lora[f].project(ctx, self.to_k, s)
            v = w.to_v_lora[f].project(val, self.to_v, s)
            o = state.attention(q, k, v, self.heads, transformer_options)
            o = w.to_out_lora[f].project(o, self.to_out[0], s)
            outs.append(self.to_out[1](o))
        hidden = hidden + torch.stack(outs)
        hidden = hidden.transpose(0, 1).reshape(x.shape[0], tokens, -1)  # back to rows (group, frame)

        # Each token attends to the same token in the other frames of its group.
        t = _linear(w.temporal_i, _layer_norm(w.temporal_n, hidden))
        t = t.reshape(groups, frames, tokens, -1).transpose(1, 2).reshape(groups * tokens, frames, -1)
        t = state.attention(_linear(w.temporal_q, t), _linear(w.temporal_k, t), _linear(w.temporal_v, t),
                            self.heads, transformer_options)
        t = _linear(w.temporal_o, t)
        t = t.reshape(groups, tokens, frames, -1).transpose(1, 2).reshape(x.shape[0], tokens, -1)
        if s != 1.0:
            t = t * s
        hidden = hidden + t
        # The block adds this to its input again (x = attn(norm(x)) + x): return the change only.
        return hidden - x


def build_attention_sharing(shapes: Sequence[AttentionShape], frames: int, use_control: bool) -> AttentionSharingWeights:
    return AttentionSharingWeights(shapes, frames, use_control)


def shared_attention_modules(originals: Sequence[nn.Module], weights: AttentionSharingWeights,
                             state: SharingState, dtype: torch.dtype | None = None) -> list[SharedAttention]:
    """One `SharedAttention` per original module, in file order (SD15_ATTENTION_MODULES).
    Moves the per-layer weights to `dtype` (the UNet's compute dtype); the control encoder stays float32."""
    if len(originals) != len(weights.hookers.layers):
        raise ModelError(f"{len(originals)} attention modules for {len(weights.hookers.layers)} weight sets")
    modules = []
    for index, (original, layer) in enumerate(zip(originals, weights.hookers.layers)):
        if dtype is not None:
            layer.to(dtype=dtype)
        modules.append(SharedAttention(original, layer, state, cross_attention=index % 2 == 1))
    return modules


def shapes_of(originals: Sequence[nn.Module]) -> list[AttentionShape]:
    """Read the feature sizes of live attention modules (anything with to_q/to_k/to_v/to_out)."""
    return [
        AttentionShape(m.to_q.in_features, m.to_k.in_features, m.to_q.out_features, m.to_out[0].out_features, m.heads)
        for m in originals
    ]
