"""LayerDiffuse for ComfyUI: transparent image layer diffusion (latent transparency) as ComfyUI nodes.

ComfyUI loads this file as a custom node package and calls `comfy_entrypoint`. There is
deliberately no NODE_CLASS_MAPPINGS: ComfyUI ignores `comfy_entrypoint` when one exists.
"""
import os

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .nodes import coexistence, model_store
from .nodes.apply import APPLY_NODES
from .nodes.flux import FLUX_NODES
from .nodes.save_layers import SAVE_LAYERS_NODES
from .nodes.transparent_vae import TRANSPARENT_VAE_NODES
from .nodes.upscale import UPSCALE_NODES

NODES = [*APPLY_NODES, *TRANSPARENT_VAE_NODES, *FLUX_NODES, *UPSCALE_NODES, *SAVE_LAYERS_NODES]


class LayerDiffuseExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> LayerDiffuseExtension:
    model_store.register_folder()
    coexistence.watch_for_shared_ids(NODES, os.path.dirname(os.path.realpath(__file__)))
    return LayerDiffuseExtension()
