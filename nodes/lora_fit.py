"""LoRA-format patch files on a model through ComfyUI's own LoRA loading, refusing a file that
does not fit: the SDXL patch files and the LayerDiffuse-Flux LoRA both load this way.

A file fits when every key names a model weight in ComfyUI's LoRA key map (the names its LoRA
loading accepts for this model) and every weight it names is patched. The check compares keys,
not the warnings ComfyUI logs for keys it skips.

Host internals used here: `comfy.lora.model_lora_keys_unet`, `comfy.sd.load_lora_for_models`,
`ModelPatcher.patches`.
"""
from __future__ import annotations

from typing import Mapping

import torch

import comfy.lora
import comfy.sd
from comfy.model_patcher import ModelPatcher

from ..lib_layerdiffuse.errors import ModelError, WeightFileError

SHOWN = 5


def _target_name(key: str, key_map: Mapping[str, object]) -> str | None:
    """The key-map name a LoRA key belongs to (its longest prefix, at a '.', that the map holds:
    `x.lora_up.weight`, `x.alpha` and `x.diff` belong to `x`), or None."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:end])
        if name in key_map:
            return name
    return None


def _weight_key(target) -> str:
    # The map gives a weight's key, or (key, slice) for a part of a fused weight.
    return target if isinstance(target, str) else target[0]


def _listed(keys: list[str]) -> str:
    more = f"; ... ({len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return "; ".join(keys[:SHOWN]) + more


def apply_lora(model: ModelPatcher, lora: Mapping[str, torch.Tensor], strength: float, file_name: str,
               cure: str) -> ModelPatcher:
    """A clone of `model` with `lora` patched in at `strength` (as core's LoraLoaderModelOnly).
    Keys that fit no weight of the model are a WeightFileError (`cure` says what to do)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    names = {key: _target_name(key, key_map) for key in lora}
    unfit = sorted(key for key, name in names.items() if name is None)
    if unfit:
        raise WeightFileError(f"{file_name}: {len(unfit)} of its {len(lora)} keys fit no weight of this model "
                              f"({_listed(unfit)}). {cure}")
    patched, _ = comfy.sd.load_lora_for_models(model, None, dict(lora), strength, 0.0)
    unpatched = sorted({_weight_key(key_map[name]) for name in names.values()} - set(patched.patches))
    if unpatched:
        raise ModelError(f"{file_name}: ComfyUI did not patch {len(unpatched)} weights the file names "
                         f"({_listed(unpatched)}). {cure}")
    return patched
