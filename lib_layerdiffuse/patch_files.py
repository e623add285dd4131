"""SDXL LayerDiffuse patch files: weight offsets for an existing UNet.

The SDXL files (`layer_xl_*.safetensors`) are not networks but lists of changes to the UNet's own
weights, one entry per tensor, named `<model key>::<patch type>::<index>`:

* `<key>::lora::0` (up, [out, rank]) and `<key>::lora::1` (down, [rank, in...]): the weight gains
  `strength * up @ down` (an optional `::lora::2` scalar alpha scales it by alpha / rank);
* `<key>::diff::0`: the weight gains `strength * diff`. A diff larger than the weight (the input
  conv of the conditioning modes takes 8 or 12 channels instead of 4) first zero-pads the
  weight to the diff's shape, so the extra input channels start from the diff alone.

`parse_patch_file` turns a file's tensors into `WeightPatch`es; `check_against_model` fails,
naming the keys, when a patch has no weight in the model or cannot fit it. Which keys a file
holds is not assumed: whatever is present is mapped.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from .errors import WeightFileError

LORA = "lora"
DIFF = "diff"


class PatchFileError(WeightFileError):
    """A patch file is malformed or does not fit the model it is applied to."""


@dataclass(frozen=True)
class WeightPatch:
    """One change to one model weight (`key` as in the model's state dict)."""
    key: str
    kind: str  # LORA or DIFF
    up: Optional[torch.Tensor] = None
    down: Optional[torch.Tensor] = None
    alpha: Optional[float] = None
    diff: Optional[torch.Tensor] = None

    def delta_shape(self) -> tuple[int, ...]:
        if self.kind == DIFF:
            return tuple(self.diff.shape)
        return (self.up.shape[0],) + tuple(self.down.shape[1:])

    def pads(self, weight_shape: Sequence[int]) -> bool:
        """Whether applying this patch widens the weight (only diffs do)."""
        return self.kind == DIFF and tuple(self.diff.shape) != tuple(weight_shape)


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def parse_patch_file(state_dict: Mapping[str, torch.Tensor], file_name: str = "patch file") -> list[WeightPatch]:
    """The patches a LayerDiffuse patch file holds, in key order."""
    entries: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    malformed = []
    for name, tensor in state_dict.items():
        parts = name.split("::")
        if len(parts) != 3 or parts[1] not in (LORA, DIFF) or not parts[2].isdigit() or not parts[0]:
            malformed.append(name)
            continue
        entries[(parts[0], parts[1])][int(parts[2])] = tensor
    if malformed:
        raise PatchFileError(
            f"{file_name} is not a LayerDiffuse patch file: entries must be named "
            f"'<model key>::lora|diff::<index>', found {_listing(malformed)}"
        )
    if not entries:
        raise PatchFileError(f"{file_name} holds no patches")

    keys_with_both = {key for key, kind in entries if (key, LORA if kind == DIFF else DIFF) in entries}
    if keys_with_both:
        raise PatchFileError(f"{file_name} has both a lora and a diff patch for {_listing(keys_with_both)}")

    patches = []
    for (key, kind), parts in sorted(entries.items()):
        if kind == DIFF:
            if set(parts) != {0}:
                raise PatchFileError(f"{file_name}: the diff patch of {key} must have exactly index 0, has {sorted(parts)}")
            patches.append(WeightPatch(key, DIFF, diff=parts[0]))
            continue
        if not {0, 1} <= set(parts) <= {0, 1, 2}:
            raise PatchFileError(
                f"{file_name}: the lora patch of {key} needs index 0 (up) and 1 (down), optional 2 (alpha); "
                f"has {sorted(parts)}")
        up, down = parts[0], parts[1]
        if up.ndim != 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
            raise PatchFileError(
                f"{file_name}: the lora patch of {key} has up {list(up.shape)} and down {list(down.shape)}, "
                f"which do not multiply")
        alpha = float(parts[2].reshape(-1)[0]) if 2 in parts else None
        patches.append(WeightPatch(key, LORA, up=up, down=down, alpha=alpha))
    return patches


def check_against_model(patches: Sequence[WeightPatch], weight_shapes: Mapping[str, Sequence[int]],
                        file_name: str = "patch file") -> None:
    """Raise PatchFileError naming every patch without a model weight or of a shape that cannot
    apply: a lora's `up @ down` must have the weight's shape (numel, for convs), a diff the
    weight's shape or a larger one in every dimension (the weight is zero-padded to it)."""
    unknown = [p.key for p in patches if p.key not in weight_shapes]
    if unknown:
        raise PatchFileError(
            f"{file_name}: {len(unknown)} of its {len(patches)} patches name weights this model does not have: "
            f"{_listing(unknown)}. Is it the file for this model family (SD1.5 / SDXL)?"
        )
    wrong = []
    for p in patches:
        shape = tuple(weight_shapes[p.key])
        delta = p.delta_shape()
        if p.kind == LORA:
            fits = torch.Size(delta).numel() == torch.Size(shape).numel() and delta[0] == shape[0]
        else:
            fits = len(delta) == len(shape) and all(d >= s for d, s in zip(delta, shape))
        if not fits:
            wrong.append(f"{p.key} ({p.kind} {list(delta)} for weight {list(shape)})")
    if wrong:
        raise PatchFileError(f"{file_name}: patches that do not fit the model's weights: {_listing(wrong, 5)}")


def pad_to(weight: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`weight` zero-padded at the end of each dimension to `shape`."""
    if tuple(weight.shape) == tuple(shape):
        return weight
    out = weight.new_zeros(tuple(shape))
    out[tuple(slice(0, s) for s in weight.shape)] = weight
    return out


def patched_weight(weight: torch.Tensor, patch: WeightPatch, strength: float = 1.0) -> torch.Tensor:
    """What a weight becomes under one patch, computed in float32 (the definition the host's
    own patching is tested against)."""
    base = weight.float()
    if patch.kind == DIFF:
        return pad_to(base, patch.diff.shape) + strength * patch.diff.float()
    scale = strength * (patch.alpha / patch.down.shape[0] if patch.alpha is not None else 1.0)
    delta = torch.mm(patch.up.float(), patch.down.float().flatten(1)).reshape(base.shape)
    return base + scale * delta


def input_channels(patches: Sequence[WeightPatch], conv_in_key: str) -> Optional[int]:
    """The input channel count a file's patches give the UNet's input conv, or None if untouched."""
    for p in patches:
        if p.key == conv_in_key and p.kind == DIFF:
            return int(p.diff.shape[1])
    return None

