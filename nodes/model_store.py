"""ComfyUI glue for weight files: the `layer_model` models folder, downloads, loaded networks.

Networks are wrapped in a ComfyUI `ModelPatcher` and moved to the GPU with `load_models_gpu`, so
ComfyUI offloads them like its own models. A small LRU keeps the last few on the offload device
so that a second prompt does not read the file again; a file replaced on disk is read again.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Callable, Mapping

import torch
from torch import nn

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.ops
import comfy.utils
import folder_paths

from ..lib_layerdiffuse.download import download, downloads_off_reason, not_downloadable_message
from ..lib_layerdiffuse.weight_files import WeightFile, build_model, read_safetensors

FOLDER = "layer_model"
EXTENSIONS = {".safetensors"}
CACHED_NETWORKS = 4

# (path, prefix, device, dtype) -> (the file's signature when it was read, the network)
_networks: "OrderedDict[tuple, tuple[tuple, comfy.model_patcher.ModelPatcher]]" = OrderedDict()


def register_folder() -> None:
    """Add models/layer_model, keeping any paths extra_model_paths.yaml already gave it."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths = list(folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))[0])
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))


def ensure_weight_file(weight_file: WeightFile) -> str:
    """The file's path in a layer_model folder; downloaded first (from the Hub, or the mirror
    HF_ENDPOINT names) when it is in none. (The folder is registered once, by the pack's entry point.)"""
    path = folder_paths.get_full_path(FOLDER, weight_file.name)
    if path is not None:
        return path
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    logging.info("LayerDiffuse: downloading %s from %s to %s", weight_file.name, weight_file.repo_id, folder)
    bar = comfy.utils.ProgressBar(1)
    return download(weight_file.repo_id, weight_file.name, folder,
                    on_progress=lambda done, total: bar.update_absolute(done, max(total, done)))


def missing_file_problem(weight_file: WeightFile) -> str | None:
    """Why a prompt that needs `weight_file` cannot run, for a node's validate_inputs: the file is in
    no layer_model folder and cannot be downloaded (HF_HUB_OFFLINE, no huggingface_hub). None when
    it is there or will be downloaded on first use. ComfyUI rejects a prompt with every node's
    validation problem at once, so every missing file is named in one answer."""
    reason = downloads_off_reason()
    if reason is not None and folder_paths.get_full_path(FOLDER, weight_file.name) is None:
        folder = folder_paths.get_folder_paths(FOLDER)[0]
        return not_downloadable_message(weight_file.repo_id, weight_file.name, folder, reason)
    return None


def validate_file_choice(name: str, choice: str | None, files: Mapping[str, WeightFile]) -> bool | str:
    """validate_inputs for the combo input `name` that chooses one of `files`: True when the choice
    is one of them and its file is there or can be downloaded (or the value comes from another node,
    None here, and is checked when the node runs), else the problem as ComfyUI shows it."""
    if choice is None:
        return True
    if choice not in files:
        return f"{name} must be one of {', '.join(files)}, not {choice!r}"
    return missing_file_problem(files[choice]) or True


def file_signature(path: str) -> tuple:
    """What changes when the file at `path` (or the file its link points to) is replaced or rewritten."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size


def chosen_file_fingerprint(choice: str | None, files: Mapping[str, WeightFile]) -> tuple:
    """fingerprint_inputs for a node that reads the file a combo chooses (every one of `files` while
    the choice comes from another node): it changes when that file is replaced on disk, so that
    ComfyUI runs the node again instead of reusing the output it made with the old file."""
    chosen = [files[choice]] if choice in files else list(files.values())
    return files_fingerprint(*(weight_file.name for weight_file in chosen))


def files_fingerprint(*names: str) -> tuple:
    """The signatures of the named files in the layer_model folders (None for one that is not there)."""
    paths = [folder_paths.get_full_path(FOLDER, name) for name in names]
    return tuple(file_signature(path) if path is not None else None for path in paths)


def compute_dtype(device: torch.device) -> torch.dtype:
    """ComfyUI's choice for the device: float16 where it supports it, else float32."""
    return torch.float16 if model_management.should_use_fp16(device) else torch.float32


def network(path: str, factory: Callable[..., nn.Module], dtype: torch.dtype | None = None,
            prefix: str = "") -> comfy.model_patcher.ModelPatcher:
    """The network stored in the file at `path` (or in its tensors named `prefix`...), loaded
    strictly, as a ModelPatcher (not yet on the GPU); weights in `dtype`, by default ComfyUI's
    choice for the device."""
    signature = file_signature(path)
    device = model_management.get_torch_device()
    offload = model_management.unet_offload_device()
    dtype = dtype or compute_dtype(device)
    key = (path, prefix, str(device), dtype)
    if key in _networks and _networks[key][0] == signature:
        _networks.move_to_end(key)
        return _networks[key][1]
    label = os.path.basename(path) + (f" ({prefix}*)" if prefix else "")
    # Built from ComfyUI's layers, as core builds its models (weights already in `dtype`: nothing to cast).
    module = build_model(factory, read_safetensors(path, prefix), label, device=offload, dtype=dtype,
                         operations=comfy.ops.disable_weight_init)
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=device, offload_device=offload)
    _networks[key] = (signature, patcher)
    _networks.move_to_end(key)
    while len(_networks) > CACHED_NETWORKS:
        _networks.popitem(last=False)
    return patcher


def load_to_device(patcher: comfy.model_patcher.ModelPatcher, working_memory: int) -> nn.Module:
    """Make room for the network plus `working_memory` bytes and load it fully; returns the module."""
    model_management.load_models_gpu([patcher], memory_required=working_memory, force_full_load=True)
    return patcher.model
