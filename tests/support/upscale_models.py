"""A small real upscale model (spandrel's SRVGGNetCompact) with known weights, for tests that load
one through core's Load Upscale Model, in process or on a live server."""
from __future__ import annotations

from pathlib import Path

import torch


def compact_state_dict(channels: int = 3) -> dict:
    """A real spandrel SRVGGNetCompact (2x) set to blur 3x3 and enlarge: a linear model that mixes
    neighbours, so that straight colour would bleed into the edges. Features: 0..c-1 the blurred
    image, c..2c-1 the image; the last convolution gives blur - image, and the network adds the
    nearest-upscaled image."""
    from spandrel.architectures.Compact import Compact

    model = Compact(num_in_ch=channels, num_out_ch=channels, num_feat=2 * channels, num_conv=1, upscale=2)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for c in range(channels):
        state["body.0.weight"][c, c] = 1 / 9
        state["body.0.weight"][channels + c, c, 1, 1] = 1
        state["body.2.weight"][c, c, 1, 1] = 1
        state["body.2.weight"][channels + c, channels + c, 1, 1] = 1
        for sub in range(4):
            state["body.4.weight"][4 * c + sub, c, 1, 1] = 1
            state["body.4.weight"][4 * c + sub, channels + c, 1, 1] = -1
    for key in ("body.1.weight", "body.3.weight"):
        state[key] = torch.ones_like(state[key])  # PReLU slope 1: the identity
    return state


def write_compact_model(path: Path, channels: int = 3) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        save_file(compact_state_dict(channels), str(path))
    return path
