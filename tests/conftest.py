"""Fixtures of the whole suite.

Layout: `lib/` tests the library alone (no ComfyUI), `host/` runs the pack inside a real ComfyUI
process, `server/` talks to a live ComfyUI server over HTTP, `browser/` drives ComfyUI's own
frontend in headless Chromium. Each folder's tests carry the marker of its name; `registration`
marks the tests that load the pack through ComfyUI's loader and check what it registers. The fast
lane is `python -m pytest tests -m "lib or registration"`.

The host is found through COMFYUI_PATH, else the ComfyUI this pack is installed in, else
~/comfy/ComfyUI. Without one, host tests skip with the reason, or fail under CI=true.
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from support.environment import find_comfyui, unavailable
from support.pack import pack_module
from support.paths import PACK_ROOT
from support.sd_models import load_sd15_model, release_models
from support.server import ComfyServer, ServerError, link_into, make_base, start
from support.synth import synthetic_file

if str(PACK_ROOT) not in sys.path:
    # Appended, not prepended: the pack's `nodes` package must not shadow ComfyUI's nodes.py.
    sys.path.append(str(PACK_ROOT))

FOLDER_MARKERS = ("lib", "host", "server", "browser")
TESTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.fspath)).resolve().relative_to(TESTS_DIR).parts[0]
        if folder in FOLDER_MARKERS:
            item.add_marker(folder)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    """The ComfyUI checkout, importable in this process on the CPU."""
    path, reason = find_comfyui()
    if path is None:
        unavailable(reason)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    return path


@pytest.fixture(scope="session")
def pack(comfyui_path: Path):
    """This pack loaded through ComfyUI's own custom-node loader; returns ComfyUI's `nodes` module."""
    import nodes as comfy_nodes

    loaded = asyncio.run(comfy_nodes.load_custom_node(str(PACK_ROOT)))
    assert loaded, "ComfyUI failed to load the pack (see the log above)"
    return comfy_nodes


@pytest.fixture(scope="session")
def apply_module(pack):
    return pack_module("nodes.apply")


@pytest.fixture(scope="module", autouse=True)
def models_released_after_each_module():
    """After each module: ComfyUI's models released and their memory given back to the system, for
    the next module's models and for the servers that later tests start. Runs after the module's
    own fixtures have dropped their models (autouse fixtures are set up first)."""
    yield
    if "comfy.model_management" in sys.modules:
        release_models()


@pytest.fixture(scope="module")
def sd15_model(pack):
    """The synthetic SD1.5 checkpoint's MODEL (float32 UNet on the CPU), as the goldens load it,
    in a host with the pack loaded. Per module, so that the memory is back before the next
    module's models load."""
    return load_sd15_model(synthetic_file("sd15_checkpoint"))


@pytest.fixture(scope="session")
def server_models(tmp_path_factory) -> Path:
    """The base directory of the test server; tests link the files they need into its models."""
    return make_base(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="module")
def comfy_server(server_models: Path) -> ComfyServer:
    """A live ComfyUI (--cpu) with this pack, a synthetic SD1.5 checkpoint and synthetic
    transparent VAE files for SD15 and SDXL. One per module: a server holds its models for as long
    as it runs, and the modules that start servers of their own need that memory."""
    comfy, reason = find_comfyui()
    if comfy is None:
        unavailable(reason)
    link_into(server_models, "checkpoints", synthetic_file("sd15_checkpoint"), "sd15_synthetic.safetensors")
    for stem in ("vae_transparent_decoder", "vae_transparent_encoder",
                 "layer_sd15_vae_transparent_decoder", "layer_sd15_vae_transparent_encoder"):
        link_into(server_models, "layer_model", synthetic_file(stem))
    try:
        server = start(comfy, server_models)
    except ServerError as error:
        pytest.fail(str(error))
    yield server
    server.stop()
