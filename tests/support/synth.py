"""Synthetic weights of the official layouts (the testkit's generator), as files or tensors, and
the reference outputs (goldens) made with them."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from .paths import TESTKIT_DIR

CACHE = Path(os.environ.get("LAYERDIFFUSE_TEST_CACHE", Path.home() / ".cache" / "comfyui-layerdiffuse" / "synth"))


@functools.cache
def synthweights() -> ModuleType:
    """The testkit's generator module: values are a pure function of (seed, key, shape)."""
    spec = importlib.util.spec_from_file_location("synthweights", TESTKIT_DIR / "synthweights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def manifest(stem: str) -> dict:
    """The layout of one file (manifests/<stem>.json.gz): key -> shape and dtype, its file name."""
    return synthweights().load_manifest(TESTKIT_DIR / "manifests" / f"{stem}.json.gz")


def state_dict(stem: str, seed: int = 0, dtype: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The synthetic tensors of a layout, in memory."""
    return synthweights().make_state_dict(manifest(stem), seed=seed, dtype=dtype)


def meta_state(stem: str) -> dict[str, torch.Tensor]:
    """A layout as meta tensors: key set and shapes without any memory."""
    return {k: torch.empty(v["shape"], device="meta") for k, v in manifest(stem)["tensors"].items()}


def synthetic_file(stem: str, seed: int = 0, dtype: Optional[str] = None) -> Path:
    """A .safetensors file of the layout, named like the official file, cached across runs. The
    generator runs in a process of its own: a checkpoint holds gigabytes while it is written, and
    they go back to the system with that process."""
    path = CACHE / f"seed{seed}-{dtype or 'manifest'}" / manifest(stem)["file"]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.part")
        command = [sys.executable, str(TESTKIT_DIR / "synthweights.py"),
                   str(TESTKIT_DIR / "manifests" / f"{stem}.json.gz"), str(partial), "--seed", str(seed)]
        subprocess.run(command + (["--dtype", dtype] if dtype else []), check=True, capture_output=True)
        os.replace(partial, path)
    return path


def golden(stem: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(description, tensors) of goldens/<stem>.{json,safetensors}."""
    from safetensors.torch import load_file

    folder = TESTKIT_DIR / "goldens"
    return json.loads((folder / f"{stem}.json").read_text()), load_file(str(folder / f"{stem}.safetensors"))
