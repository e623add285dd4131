#!/usr/bin/env python3
"""Deterministic synthetic weights for a state-dict manifest.

A manifest (manifests/*.json) lists every tensor of a real weight file by key,
shape and dtype. The official files cannot be downloaded here, so tests build a
file of exactly the same layout whose values are a pure function of
(seed, key, shape): any two programs that follow this module get bit-identical
tensors, which is what golden comparisons rely on.

    python synthweights.py MANIFEST.json OUT.safetensors [--seed N] [--dtype float16]

Values: numpy PCG64 seeded from sha256("{seed}:{key}"), float32 standard
normals, scaled so that deep nets stay finite:
  * ndim >= 2 weights:        N(0, 1) / sqrt(fan_in)      (fan_in = prod(shape[1:]))
  * 1-d ".weight" tensors:      1 + 0.05 * N(0, 1)   (norm gains: in every model here a
                               1-d weight is a Group/LayerNorm scale, whatever its name,
                               e.g. LDM ResBlocks' in_layers.0 / out_layers.0, out.0, and
                               LayerDiffuse's temporal_n)
  * other 1-d tensors (bias):  0.02 * N(0, 1)
  * 0-d tensors:              0.5
  * integer tensors:          arange over the last axis (position ids)
  * LayerDiffuse patch entries "<model key>::<patch type>::<index>":
      lora, index 0 (up, out x rank):   N(0, 1) * 0.1 / sqrt(rank)
      lora, index 1 (down, rank x in):  N(0, 1) / sqrt(in)
      diff (ndim >= 2):                 N(0, 1) * 0.1 / sqrt(fan_in)
      diff (1-d):                       0.01 * N(0, 1)
"""
import argparse
import gzip
import hashlib
import json
import math
import sys

import numpy as np

FORMAT = "layerdiffuse-manifest/1"


def _rng(seed, key):
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little")))


def _normal(seed, key, shape):
    return _rng(seed, key).standard_normal(size=tuple(shape), dtype=np.float32)


def tensor_values(key, shape, dtype="float32", seed=0):
    """The float32/int64 numpy array for one manifest entry."""
    shape = tuple(int(s) for s in shape)
    if dtype.startswith("int") or dtype.startswith("uint"):
        last = shape[-1] if shape else 1
        return np.broadcast_to(np.arange(last, dtype=np.int64), shape).copy()
    if len(shape) == 0:
        return np.array(0.5, dtype=np.float32)
    n = _normal(seed, key, shape)
    if "::" in key:
        _, patch_type, index = key.split("::")
        if patch_type == "lora" and index == "0" and len(shape) >= 2:
            return n * np.float32(0.1 / math.sqrt(shape[1]))
        if patch_type == "lora" and index == "1" and len(shape) >= 2:
            return n * np.float32(1.0 / math.sqrt(math.prod(shape[1:])))
        if len(shape) >= 2:
            return n * np.float32(0.1 / math.sqrt(math.prod(shape[1:])))
        return n * np.float32(0.01)
    if len(shape) >= 2:
        return n * np.float32(1.0 / math.sqrt(math.prod(shape[1:])))
    if key.endswith(".weight"):  # 1-d weights are norm gains (see module docstring)
        return np.float32(1.0) + np.float32(0.05) * n
    return n * np.float32(0.02)


def load_manifest(path):
    # The pack's copy stores its manifests gzipped (manifests/*.json.gz).
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} manifest")
    return manifest


def make_state_dict(manifest, seed=0, dtype=None):
    """{key: torch.Tensor} following the manifest; dtype overrides float dtypes."""
    import torch

    out = {}
    for key, entry in manifest["tensors"].items():
        want = entry["dtype"]
        array = tensor_values(key, entry["shape"], want, seed)
        # np.ascontiguousarray turns 0-d arrays into shape (1,); reshape keeps 0-d entries 0-d
        tensor = torch.from_numpy(np.ascontiguousarray(array)).reshape(tuple(int(s) for s in entry["shape"]))
        if tensor.is_floating_point():
            tensor = tensor.to(getattr(torch, dtype or want))
        out[key] = tensor
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="override float dtype, e.g. float32")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    manifest = load_manifest(args.manifest)
    state_dict = make_state_dict(manifest, args.seed, args.dtype)
    save_file(state_dict, args.out, metadata=manifest.get("metadata") or None)
    print(f"{args.out}: {len(state_dict)} tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
