"""The feature sizes of the SD1.5 UNet's 32 attention modules, so the official attention-sharing
files can be built and checked without a model."""
from __future__ import annotations

from lib_layerdiffuse.attention_sharing import SD15_ATTENTION_MODULES, AttentionShape

_DOWN_WIDTH = {1: 320, 2: 320, 4: 640, 5: 640, 7: 1280, 8: 1280}
_UP_WIDTH = {3: 1280, 4: 1280, 5: 1280, 6: 640, 7: 640, 8: 640, 9: 320, 10: 320, 11: 320}
MIDDLE_WIDTH = 1280
CONTEXT_DIM = 768
HEADS = 8


def sd15_attention_shapes() -> list[AttentionShape]:
    """One shape per module of SD15_ATTENTION_MODULES, in that order."""
    shapes = []
    for name in SD15_ATTENTION_MODULES:
        block, index = name.split(".")[:2]
        width = {"input_blocks": _DOWN_WIDTH, "output_blocks": _UP_WIDTH}.get(block, {}).get(int(index), MIDDLE_WIDTH)
        context = width if name.endswith("attn1") else CONTEXT_DIM
        shapes.append(AttentionShape(width, context, width, width, HEADS))
    return shapes
