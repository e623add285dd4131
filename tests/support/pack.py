"""The pack as ComfyUI's custom-node loader imported it, and its nodes run in-process."""
from __future__ import annotations

import sys
from types import ModuleType

from .paths import PACK_ROOT


def pack_module(name: str) -> ModuleType:
    """A module of the loaded pack (e.g. "nodes.apply"). The loader names the pack's modules after
    its folder's path, so classes from them (errors, node classes) are these, not the ones a plain
    `import lib_layerdiffuse` gives."""
    for module_name, module in list(sys.modules.items()):
        if module_name.endswith("." + name) and str(getattr(module, "__file__", "")).startswith(str(PACK_ROOT)):
            return module
    raise LookupError(f"{name} is not a module of the loaded pack (is the `pack` fixture in use?)")


def run_node(comfy_nodes: ModuleType, node_id: str, **inputs):
    """The outputs of one node, executed the way ComfyUI's executor calls a V3 node's execute."""
    result = comfy_nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs)
    return result.result if hasattr(result, "result") else result
