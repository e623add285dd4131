"""Where the pack's nodes appear in ComfyUI: their menu categories and the words the node search
also finds them by (on hosts whose schemas take search aliases)."""
from __future__ import annotations

CATEGORY = "layer_diffuse"
FLUX_CATEGORY = "layer_diffuse/flux"
SEARCH_ALIASES = ["layerdiffuse", "layer diffuse", "transparent", "transparency", "alpha", "rgba", "layers"]
