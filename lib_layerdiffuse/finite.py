"""Non-finite values (NaN, inf) in a node's input or a network's output are an error: decoded,
they give an all-transparent black image that looks like a model problem."""
from __future__ import annotations

import torch

from .errors import InputError

# The usual causes, and what to do about them.
VAE_CURE = ("a VAE in float16 overflows: run it in float32 (--fp32-vae) or bfloat16 (--bf16-vae), "
            "or check the node that made the image")
LATENT_CURE = ("the sampler diverged or an upstream node broke it: lower the CFG or LoRA strengths, run the "
               "model in float32 or bfloat16, or check the node that made the latent")
IMAGE_CURE = "check the node that made it (an upscale model or VAE in float16 can overflow)"
DECODER_CURE = "the network overflowed in float16: set precision to bfloat16 or float32"


class NonFiniteError(InputError):
    """A tensor holds NaN or inf."""


def require_finite(x: torch.Tensor, node: str, what: str, cure: str) -> None:
    """Raise NonFiniteError naming the node, the input and how many values are bad. One reduction
    when all is well; the counting happens only on failure."""
    if bool(torch.isfinite(x).all()):
        return
    nan = int(torch.isnan(x).sum())
    infinite = int(torch.isinf(x).sum())
    raise NonFiniteError(f"{node}: {what} holds {nan} NaN and {infinite} infinite values (of {x.numel()}); {cure}")
