"""How the pack registers in ComfyUI beyond its node list: search aliases where the host's schemas
take them, and a warning, once, when another pack (such as huchenlei/ComfyUI-layerdiffuse)
registers the same node ids before or after this one."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from support.paths import PACK_ROOT

pytestmark = pytest.mark.registration

# A pack loaded in a fresh ComfyUI process, in the given order with another pack that registers
# two of our node ids; prints the warnings logged.
LOAD_BOTH = """
import asyncio, json, logging, sys
import comfy.cli_args
comfy.cli_args.args.cpu = True
import folder_paths, nodes
folder_paths.folder_names_and_paths["custom_nodes"] = ([sys.argv[1]], set())
warnings = []
class Collect(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())
logging.getLogger().addHandler(Collect())
async def load_all():  # as ComfyUI's startup loads custom_nodes/, in one pass of the event loop
    for path in sys.argv[2:]:
        assert await nodes.load_custom_node(path), path
asyncio.run(load_all())
print(json.dumps(warnings))
"""


def _other_pack(folder):
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(
        "class Stand:\n"
        "    @classmethod\n"
        "    def INPUT_TYPES(cls):\n"
        "        return {'required': {}}\n"
        "    RETURN_TYPES = ()\n"
        "    FUNCTION = 'run'\n"
        "    CATEGORY = 'old'\n"
        "NODE_CLASS_MAPPINGS = {'LayeredDiffusionApply': Stand, 'LayeredDiffusionDecode': Stand}\n")
    return folder


@pytest.mark.parametrize("order", ["other pack first", "other pack after"])
def test_another_pack_with_our_node_ids_is_named_once(comfyui_path, tmp_path, order):
    custom_nodes = tmp_path / "custom_nodes"
    other = _other_pack(custom_nodes / "ComfyUI-layerdiffuse")
    paths = [str(other), str(PACK_ROOT)] if order == "other pack first" else [str(PACK_ROOT), str(other)]
    result = subprocess.run([sys.executable, "-c", LOAD_BOTH, str(custom_nodes), *paths], cwd=comfyui_path,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(comfyui_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [w for w in json.loads(result.stdout.strip().splitlines()[-1]) if w.startswith("LayerDiffuse:")]
    assert len(warnings) == 1, warnings
    warning = warnings[0]
    assert str(other) in warning and str(PACK_ROOT.resolve()) in warning
    assert "LayeredDiffusionApply, LayeredDiffusionDecode" in warning and "Disable one of them" in warning


def test_no_warning_when_the_pack_is_alone(comfyui_path, tmp_path):
    result = subprocess.run([sys.executable, "-c", LOAD_BOTH, str(tmp_path), str(PACK_ROOT)], cwd=comfyui_path,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(comfyui_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [w for w in json.loads(result.stdout.strip().splitlines()[-1]) if w.startswith("LayerDiffuse:")]


def test_search_aliases_where_the_host_takes_them(pack):
    from comfy_api.latest import io

    ours = [cls for node_id, cls in pack.NODE_CLASS_MAPPINGS.items() if node_id.startswith("LayeredDiffusion")]
    assert len(ours) >= 14
    takes_aliases = "search_aliases" in {field.name for field in dataclasses.fields(io.Schema)}
    for cls in ours:
        schema = cls.GET_SCHEMA()
        if takes_aliases:
            assert {"transparent", "alpha", "rgba"} <= set(schema.search_aliases), schema.node_id
        else:
            assert not hasattr(schema, "search_aliases")
