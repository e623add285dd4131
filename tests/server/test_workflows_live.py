"""The shipped workflows, the peer pack's workflows, the template listing, the locale and the
clone-installed pack, checked against a live ComfyUI (the `comfy_server` fixture) as users meet
them; the SD1.5 workflows run end to end."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest
from PIL import Image

from support.paths import PACK_ROOT
from support.server import assert_success, link_into
from support.synth import synthetic_file
from support.upscale_models import write_compact_model
from support.workflow_runs import UPSCALE_MODEL, assert_saved_as_expected, at_size, tiny, write_inputs
from support.workflows import (
    FOREIGN_NODES,
    api_workflow_names,
    check_api,
    check_ui,
    compat_names,
    load_api,
    load_compat,
    load_ui,
    locale_node_defs,
    node_types,
    pack_node_ids,
    require_registered,
    skip_where_the_host_lacks_layers,
    ui_to_api,
    ui_workflow_names,
)

UI_NAMES = ui_workflow_names()
API_NAMES = api_workflow_names()


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get("/object_info")










@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_workflow_fits_the_live_object_info(object_info, name):
    graph = load_ui(name)
    skip_where_the_host_lacks_layers(name, object_info)
    require_registered(object_info, node_types(graph))
    assert check_ui(graph, object_info) == []


@pytest.mark.parametrize("name", API_NAMES)
def test_api_workflow_fits_the_live_object_info(object_info, name):
    skip_where_the_host_lacks_layers(name, object_info)
    prompt = load_api(name)
    require_registered(object_info, node_types(prompt))
    assert check_api(prompt, object_info) == []


@pytest.mark.parametrize("name", UI_NAMES)
def test_api_twin_is_the_ui_workflow_converted(object_info, name):
    skip_where_the_host_lacks_layers(name, object_info)
    graph = load_ui(name)
    require_registered(object_info, node_types(graph))
    converted, shipped = ui_to_api(graph, object_info), load_api(name)
    graph_titles = {str(n["id"]): n.get("title") for n in graph["nodes"]}
    assert sorted(converted) == sorted(shipped)
    for node_id, node in shipped.items():
        assert node["class_type"] == converted[node_id]["class_type"], node_id
        assert node["inputs"] == converted[node_id]["inputs"], node_id
        # A node's title is its own where the UI graph gives one, else the host's display name,
        # which changes between versions ("DualCLIPLoader" became "Load CLIP (Dual)").
        if "_meta" in node and graph_titles.get(node_id):
            assert node["_meta"] == converted[node_id]["_meta"], node_id


def test_converter_sees_a_changed_widget(object_info):
    """The sync check above can fail: a UI edit that is not carried to the API twin shows up."""
    graph = load_ui("sd15_transparent_decode")
    decode = next(n for n in graph["nodes"] if n["type"] == "LayeredDiffusionDecodeRGBA")
    decode["widgets_values"][0] = "SDXL"
    converted = ui_to_api(graph, object_info)
    assert converted[str(decode["id"])]["inputs"]["sd_version"] == "SDXL" != \
        load_api("sd15_transparent_decode")[str(decode["id"])]["inputs"]["sd_version"]
    assert check_api({**converted, "x": {"class_type": "NoSuchNode", "inputs": {}}}, object_info) == \
        ["x: unknown node type NoSuchNode"]


@pytest.mark.parametrize("name", compat_names())
def test_peer_workflow_fits_the_live_object_info(object_info, name):
    graph = load_compat(name)
    require_registered(object_info, node_types(graph) - FOREIGN_NODES)
    assert check_ui(graph, object_info, ignore_types=FOREIGN_NODES, strict_widgets=False) == []


def test_the_template_browser_lists_the_workflows_with_thumbnails(comfy_server):
    listing = comfy_server.get("/api/workflow_templates")
    module = PACK_ROOT.name
    assert sorted(listing.get(module, [])) == UI_NAMES  # workflows/api/ is not listed
    for name in UI_NAMES:
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/{module}/{name}.json") as response:
            assert json.loads(response.read()) == load_ui(name)
        # The frontend shows <name>.jpg from the same folder as the card's image.
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/{module}/{name}.jpg") as response:
            assert response.headers["Content-Type"] == "image/jpeg"
            thumbnail = Image.open(io.BytesIO(response.read()))
            assert thumbnail.format == "JPEG" and thumbnail.size[0] >= 256


def test_the_locale_names_every_node(comfy_server, object_info):
    translations = comfy_server.get("/i18n")["en"]
    node_defs = translations["nodeDefs"]
    ids = pack_node_ids()
    assert len(ids) >= 14 and ids <= set(node_defs), ids - set(node_defs)
    assert set(node_defs) <= ids, "the locale names nodes the pack does not define"
    registered = {k for k, v in object_info.items() if v.get("python_module", "").endswith("." + PACK_ROOT.name)}
    assert registered and registered <= ids
    expected = locale_node_defs(object_info, registered)
    for node_id in registered:
        # The locale is written on a ComfyUI with every output type; an older host lacks some
        # (LAYERS before 0.3x), and the node leaves those outputs out there.
        # Inputs likewise (the LAYERS input of Save Layers).
        outputs = {k: v for k, v in node_defs[node_id].get("outputs", {}).items()
                   if int(k) < len(object_info[node_id]["output"])}
        inputs = {k: v for k, v in node_defs[node_id].get("inputs", {}).items()
                  if k in expected[node_id].get("inputs", {})}
        entry = {k: v for k, v in node_defs[node_id].items() if k not in ("inputs", "outputs")}
        entry |= ({"inputs": inputs} if inputs else {}) | ({"outputs": outputs} if outputs else {})
        assert entry == expected[node_id], (
            f"locales/en/nodeDefs.json is out of date for {node_id}; rewrite it with "
            "`python tests/support/workflows.py --server <a running ComfyUI with the pack> --locale`")
    assert translations["templateWorkflows"]["category"]






def test_a_clone_installed_in_custom_nodes_is_a_working_pack(comfyui_path, object_info, tmp_path):
    """What ComfyUI-Manager and `git clone` put in custom_nodes/ loads with ComfyUI's own loader and
    registers every node; workflows, thumbnails and locale travel with it."""
    target = tmp_path / "custom_nodes" / "layerdiffuse-transparency"
    files = _repository_files()
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACK_ROOT / name, target / name)
    assert sum((target / name).stat().st_size for name in files) < 20 * 2**20, "keep the repository small"
    for name in UI_NAMES:
        assert (target / "workflows" / f"{name}.json").is_file() and (target / "workflows" / f"{name}.jpg").is_file()
    assert (target / "locales" / "en" / "nodeDefs.json").is_file()
    script = (
        "import asyncio, json, sys\n"
        "import comfy.cli_args\n"
        "comfy.cli_args.args.cpu = True\n"
        "import nodes\n"
        f"ok = asyncio.run(nodes.load_custom_node({str(target)!r}))\n"
        "print(json.dumps({'ok': ok, 'nodes': sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith('LayeredDiffusion'))}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=comfyui_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(comfyui_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["ok"], result.stderr[-3000:]
    # Upscale Layers (RGBA) exists only where the host has core's LAYERS type.
    layers_host = any("LAYERS" in node.get("output", []) for node in object_info.values())
    assert set(loaded["nodes"]) == pack_node_ids() - (set() if layers_host else {"LayeredDiffusionUpscaleLayers"})
    registered = {k for k, v in object_info.items() if v.get("python_module", "").endswith("." + PACK_ROOT.name)}
    assert registered == set(loaded["nodes"])


# --- running them -------------------------------------------------------------------------------------

SD15_LAYER_FILES = ("layer_sd15_transparent_attn", "layer_sd15_joint", "layer_sd15_fg2bg", "layer_sd15_bg2fg")
SD15_RUNS = [n for n in API_NAMES if n.startswith("sd15_")]
# Workflows of any RGBA image, no checkpoint.
TOOL_RUNS = ["rgba_upscale_with_model", "layers_upscale_and_save"]
# A size other than the shipped and the tiny one, not square: width, height.
CHANGED_SIZE = (96, 64)


@pytest.fixture(scope="module")
def sd15_workflow_files(comfy_server) -> None:
    write_inputs(comfy_server.base / "input")
    write_inputs(comfy_server.base / "input", CHANGED_SIZE)
    write_compact_model(comfy_server.base / "models" / "upscale_models" / UPSCALE_MODEL)
    for stem in SD15_LAYER_FILES:
        link_into(comfy_server.base, "layer_model", synthetic_file(stem))


@pytest.mark.parametrize("name", SD15_RUNS)
def test_sd15_api_workflow_runs_end_to_end(comfy_server, object_info, sd15_workflow_files, name):
    prompt = load_api(name)
    require_registered(object_info, node_types(prompt))
    entry = comfy_server.run(tiny(prompt, "sd15_synthetic.safetensors"))
    assert_success(entry)
    assert_saved_as_expected(comfy_server, prompt, entry)


def test_every_api_workflow_is_run_here_or_in_the_sdxl_and_flux_tests():
    assert set(API_NAMES) == {n for n in API_NAMES if n.startswith(("sdxl_", "flux_"))} | set(SD15_RUNS) | set(TOOL_RUNS)


@pytest.mark.parametrize("name", TOOL_RUNS)
def test_tool_api_workflow_runs_end_to_end(comfy_server, object_info, sd15_workflow_files, name):
    skip_where_the_host_lacks_layers(name, object_info)
    prompt = load_api(name)
    require_registered(object_info, node_types(prompt))
    entry = comfy_server.run(prompt)
    assert_success(entry)
    assert_saved_as_expected(comfy_server, prompt, entry)


@pytest.mark.parametrize("name", SD15_RUNS + TOOL_RUNS)
def test_api_workflow_runs_at_a_changed_size(comfy_server, object_info, sd15_workflow_files, name):
    """The size set in its one place (or the input images' size) is the size of every output."""
    skip_where_the_host_lacks_layers(name, object_info)
    prompt = load_api(name)
    if name in SD15_RUNS:
        prompt = tiny(prompt, "sd15_synthetic.safetensors")
    prompt = at_size(prompt, CHANGED_SIZE)
    entry = comfy_server.run(prompt)
    assert_success(entry)
    assert_saved_as_expected(comfy_server, prompt, entry, made_at=CHANGED_SIZE)


def _repository_files() -> list[str]:
    """The files a clone would get once the working tree is committed: tracked plus untracked,
    minus what .gitignore excludes."""
    if shutil.which("git") is None or not (PACK_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=PACK_ROOT,
                             capture_output=True, check=True).stdout.decode()
    return [name for name in listing.split("\0") if name and (PACK_ROOT / name).is_file()]
