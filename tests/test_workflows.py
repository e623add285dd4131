"""The shipped workflows, the peer pack's workflows, the template listing, the locale and the
install metadata, checked against a live ComfyUI (the `comfy_server` fixture) as users meet them.

Workflows that use the Layer Diffuse Apply nodes are skipped, with that reason, while those nodes
are not registered on the live server.
"""
from __future__ import annotations

import ast
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import find_testkit
from workflow_helpers import (
    PACK_ROOT,
    WORKFLOW_DIR,
    api_workflow_names,
    check_api,
    check_ui,
    load_api,
    locale_node_defs,
    load_ui,
    node_types,
    ui_to_api,
    ui_workflow_names,
)

UI_NAMES = ui_workflow_names()
API_NAMES = api_workflow_names()
LAYER_DIFFUSE_NAMES = [n for n in UI_NAMES if not n.startswith("flux_")]
APPLY_NODES = ("LayeredDiffusionApply", "LayeredDiffusionJointApply", "LayeredDiffusionCondApply",
               "LayeredDiffusionCondJointApply", "LayeredDiffusionDiffApply")
DECODERS = {"LayeredDiffusionDecodeRGBA", "LayeredDiffusionDecodeSplit", "LayeredDiffusionFluxDecode"}
OFFICIAL = "https://huggingface.co/LayerDiffusion/layerdiffusion-v1/resolve/main/"
COMPAT_DIR = (find_testkit() or PACK_ROOT.parent / "shared" / "testkit").parent / "compat" / "huchenlei-example-workflows"
# Nodes of other packs that the peer's examples use; not ours to provide.
FOREIGN_NODES = {"ImageResize+"}
# Test inputs named like the shipped workflows' Load Image values.
INPUT_IMAGES = ("layerdiffuse_fg.png", "layerdiffuse_bg.png", "layerdiffuse_blend.png")
TINY = 64


def weight_registry() -> dict:
    from lib_layerdiffuse.weight_files import WEIGHT_FILES  # plain torch; conftest puts the pack on sys.path

    return WEIGHT_FILES


def pack_node_ids() -> set[str]:
    """Every node id the pack's modules define (registered or not yet), read from the source."""
    ids = set()
    for path in (PACK_ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "node_id" and isinstance(node.value, ast.Constant):
                ids.add(node.value.value)
    return ids


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get("/object_info")


def require_types(info: dict, types) -> None:
    absent = sorted(t for t in types if t not in info and t in pack_node_ids())
    if absent:
        pytest.skip(f"{', '.join(absent)} not registered on the live server yet (issue 3: the apply nodes are "
                    "not in __init__.py's node list)")


# --- the files themselves -----------------------------------------------------------------------------

def test_every_ui_workflow_has_an_api_twin():
    assert UI_NAMES == API_NAMES
    assert len(LAYER_DIFFUSE_NAMES) >= 14


def test_every_generation_mode_has_a_workflow():
    configs = {(node["type"], value) for name in UI_NAMES for node in load_ui(name)["nodes"]
               if node["type"] in APPLY_NODES for value in node["widgets_values"] if isinstance(value, str)}
    source = (PACK_ROOT / "nodes" / "apply.py").read_text()
    expected = {("LayeredDiffusionApply", c) for c in ("SDXL, Attention Injection", "SDXL, Conv Injection",
                                                        "SD15, Attention Injection, attn_sharing")}
    expected |= {("LayeredDiffusionJointApply", "SD15, attn_sharing, Batch size (3N)")}
    expected |= {("LayeredDiffusionCondApply", c) for c in ("SDXL, Foreground", "SDXL, Background")}
    expected |= {("LayeredDiffusionCondJointApply", f"SD15, {c}, attn_sharing, Batch size (2N)")
                 for c in ("Foreground", "Background")}
    expected |= {("LayeredDiffusionDiffApply", c) for c in ("SDXL, Foreground", "SDXL, Background")}
    assert len(expected) == 10 and all(config in source for _, config in expected)
    assert expected <= configs, expected - configs
    kinds = {t for name in UI_NAMES for t in node_types(load_ui(name))}
    assert {"LayeredDiffusionEncode", "LayeredDiffusionDecodeSplit", "LayeredDiffusionDecodeRGBA"} <= kinds
    stop_at = [name for name in UI_NAMES for n in load_ui(name)["nodes"]
               if n["type"] == "LayeredDiffusionApply" and len(n["widgets_values"]) > 2 and n["widgets_values"][2] < 1]
    assert stop_at, "no workflow shows stop_at"


def _fed_by(graph: dict, node: dict, input_name: str):
    links = {link[0]: link for link in graph["links"]}
    nodes = {n["id"]: n for n in graph["nodes"]}
    slot = next(s for s in node["inputs"] if s["name"] == input_name)
    link = links[slot["link"]]
    return nodes[link[1]], link[2]


@pytest.mark.parametrize("name", LAYER_DIFFUSE_NAMES)
def test_ui_workflow_conventions(name):
    """Notes that say what to load and which sizes/batches, clean layout, downloadable models,
    Save Image of the RGBA result plus the checkerboard preview, a thumbnail."""
    graph = load_ui(name)
    assert "ds" not in graph.get("extra", {}), "extra.ds pins the view; leave it out so the frontend fits the graph"
    notes = [n["widgets_values"][0] for n in graph["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes, "no note in the graph"
    text = "\n".join(notes)
    assert "Size" in text and "Batch" in text and "huggingface.co" in text and "Memory" in text
    registry = weight_registry()
    models = graph.get("models", [])
    layer_files = [m for m in models if m["directory"] == "layer_model"]
    assert layer_files, "no LayerDiffuse weight in the workflow's models list"
    for model in models:
        assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith(model["name"])
        assert model["name"].endswith(".safetensors"), "ComfyUI's download dialog only takes .safetensors"
        assert model["name"] in text, f"the notes should name {model['name']}"
    for model in layer_files:
        assert model["url"] == registry[model["name"]].url == OFFICIAL + model["name"]
    by_node = [m for n in graph["nodes"] for m in n.get("properties", {}).get("models", [])]
    assert by_node and all(m in models for m in by_node)
    checkpoint = next(n for n in graph["nodes"] if n["type"] == "CheckpointLoaderSimple")
    assert checkpoint["properties"]["models"][0]["name"] == checkpoint["widgets_values"][0]
    for node in graph["nodes"]:
        assert node.get("mode", 0) == 0 and len(node["pos"]) == 2 and len(node["size"]) == 2
    boxes = [(n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in graph["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"overlapping nodes at {a} and {b}"
    saves = [n for n in graph["nodes"] if n["type"] == "SaveImage"]
    assert saves, "the workflow saves nothing"
    rgba_saves = [n for n in saves if _fed_by(graph, n, "images")[0]["type"] in DECODERS
                  and _fed_by(graph, n, "images")[1] == 0]
    if any(n["type"] in DECODERS for n in graph["nodes"]):
        assert rgba_saves, "the RGBA result is not saved"
        for save in rgba_saves:
            decoder = _fed_by(graph, save, "images")[0]
            previews = [n for n in graph["nodes"] if n["type"] == "LayeredDiffusionCheckerboard"
                        and _fed_by(graph, n, "image")[0] is decoder]
            assert previews and any(n["type"] == "PreviewImage" and _fed_by(graph, n, "images")[0] is previews[0]
                                    for n in graph["nodes"])
    assert (WORKFLOW_DIR / f"{name}.jpg").is_file(), "no thumbnail for the template browser"


# --- against the live server --------------------------------------------------------------------------

@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_workflow_fits_the_live_object_info(object_info, name):
    graph = load_ui(name)
    require_types(object_info, node_types(graph))
    assert check_ui(graph, object_info) == []


@pytest.mark.parametrize("name", API_NAMES)
def test_api_workflow_fits_the_live_object_info(object_info, name):
    prompt = load_api(name)
    require_types(object_info, node_types(prompt))
    assert check_api(prompt, object_info) == []


@pytest.mark.parametrize("name", UI_NAMES)
def test_api_twin_is_the_ui_workflow_converted(object_info, name):
    graph = load_ui(name)
    require_types(object_info, node_types(graph))
    converted, shipped = ui_to_api(graph, object_info), load_api(name)
    assert sorted(converted) == sorted(shipped)
    for node_id, node in shipped.items():
        assert node["class_type"] == converted[node_id]["class_type"], node_id
        assert node["inputs"] == converted[node_id]["inputs"], node_id
        if "_meta" in node:
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


def compat_names() -> list[str]:
    return sorted(p.stem for p in COMPAT_DIR.glob("*.json")) if COMPAT_DIR.is_dir() else []


@pytest.mark.skipif(not compat_names(), reason=f"the peer pack's workflows are not at {COMPAT_DIR}")
@pytest.mark.parametrize("name", compat_names())
def test_peer_workflow_fits_the_live_object_info(object_info, name):
    graph = json.loads((COMPAT_DIR / f"{name}.json").read_text())
    require_types(object_info, node_types(graph) - FOREIGN_NODES)
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
        outputs = {k: v for k, v in node_defs[node_id].get("outputs", {}).items()
                   if int(k) < len(object_info[node_id]["output"])}
        entry = {k: v for k, v in node_defs[node_id].items() if k != "outputs"} | ({"outputs": outputs} if outputs else {})
        assert entry == expected[node_id], (
            f"locales/en/nodeDefs.json is out of date for {node_id}; rewrite it with "
            "`python tests/workflow_helpers.py --server <a running ComfyUI with the pack> --locale`")
    assert translations["templateWorkflows"]["category"]


def test_install_metadata():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    project = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())
    meta = project["project"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", meta["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert (PACK_ROOT / meta["license"]["file"]).is_file()
    assert meta["description"] and meta["requires-python"]
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    for url in meta.get("urls", {}).values():
        assert url.startswith("https://")
    requirements = [line.split("#")[0].strip() for line in (PACK_ROOT / "requirements.txt").read_text().splitlines()]
    requirements = [r for r in requirements if r]
    assert all("==" not in r for r in requirements), "keep requirements loose"
    assert not any(re.match(r"(torch|torchvision|numpy|pillow)\b", r, re.I) for r in requirements), \
        "ComfyUI provides torch, numpy and pillow"
    assert sorted(map(str.lower, meta.get("dependencies", []))) == sorted(map(str.lower, requirements))
    # Workflows carry the pack's registry id and version for ComfyUI-Manager.
    for name in UI_NAMES:
        for node in load_ui(name)["nodes"]:
            props = node.get("properties", {})
            if "cnr_id" in props:
                assert props["cnr_id"] == meta["name"] and props["ver"] == meta["version"]


def _repository_files() -> list[str]:
    """The files a clone would get once the working tree is committed: tracked plus untracked,
    minus what .gitignore excludes."""
    if shutil.which("git") is None or not (PACK_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=PACK_ROOT,
                             capture_output=True, check=True).stdout.decode()
    return [name for name in listing.split("\0") if name and (PACK_ROOT / name).is_file()]


def test_a_clone_installed_in_custom_nodes_is_a_working_pack(comfyui_path, object_info, tmp_path):
    """What ComfyUI-Manager and `git clone` put in custom_nodes/ loads with ComfyUI's own loader and
    registers every node; workflows, thumbnails and locale travel with it."""
    target = tmp_path / "custom_nodes" / "comfyui-layerdiffuse"
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
    assert set(loaded["nodes"]) == pack_node_ids()
    registered = {k for k, v in object_info.items() if v.get("python_module", "").endswith("." + PACK_ROOT.name)}
    assert registered == set(loaded["nodes"])


# --- running them -------------------------------------------------------------------------------------

SD15_LAYER_FILES = ("layer_sd15_transparent_attn", "layer_sd15_joint", "layer_sd15_fg2bg", "layer_sd15_bg2fg")
SDXL_STAND_IN = "sd_xl_base_1.0.safetensors"


@pytest.fixture(scope="module")
def workflow_inputs(comfy_server) -> Path:
    """The Load Image files the shipped workflows name, in the server's input folder: a
    transparent foreground, a background and a blend."""
    folder = comfy_server.base / "input"
    y, x = np.mgrid[0:TINY, 0:TINY] / (TINY - 1)
    rgb = np.stack([x, y, 1 - x], axis=-1)
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).astype(np.float64)
    Image.fromarray((np.dstack([rgb, disc]) * 255).astype(np.uint8), "RGBA").save(folder / INPUT_IMAGES[0])
    Image.fromarray((np.dstack([y, y, x]) * 255).astype(np.uint8), "RGB").save(folder / INPUT_IMAGES[1])
    Image.fromarray((np.dstack([x * disc, y, x]) * 255).astype(np.uint8), "RGB").save(folder / INPUT_IMAGES[2])
    return folder


def _link(target: Path, source: Path) -> None:
    if not target.exists():
        target.symlink_to(source)


@pytest.fixture(scope="module")
def sd15_layer_files(comfy_server, synth_weights) -> None:
    for stem in SD15_LAYER_FILES:
        source = synth_weights(stem)
        _link(comfy_server.base / "models" / "layer_model" / source.name, source)


def _queue_module():
    spec = importlib.util.spec_from_file_location("queue_workflow", WORKFLOW_DIR / "queue_workflow.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def tiny(prompt: dict, checkpoint: str) -> dict:
    """The workflow at TINY px, one step, on the test checkpoint (as the client's overrides do)."""
    client = _queue_module()
    sizes = {"width": TINY, "height": TINY} if any("width" in n["inputs"] for n in prompt.values()) else {}
    client.apply_overrides(prompt, **sizes, sets=[f"CheckpointLoaderSimple.ckpt_name={checkpoint}", "KSampler.steps=1"])
    return prompt


def expected_saves(prompt: dict) -> dict[str, bool]:
    """SaveImage node id -> whether it saves RGBA (fed by a decoder's first output)."""
    saves = {}
    for node_id, node in prompt.items():
        if node["class_type"] == "SaveImage":
            source, slot = node["inputs"]["images"]
            saves[node_id] = prompt[source]["class_type"] in DECODERS and slot == 0
    return saves


SD15_RUNS = [n for n in API_NAMES if n.startswith("sd15_")]
SDXL_RUNS = [n for n in API_NAMES if n.startswith("sdxl_")]


@pytest.mark.parametrize("name", SD15_RUNS)
def test_sd15_api_workflow_runs_end_to_end(request, comfy_server, object_info, workflow_inputs, name):
    prompt = load_api(name)
    require_types(object_info, node_types(prompt))
    request.getfixturevalue("sd15_layer_files")
    entry = comfy_server.run(tiny(prompt, "sd15_synthetic.safetensors"))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    saves = expected_saves(prompt)
    assert saves and any(saves.values()) == any(n["class_type"] in DECODERS for n in prompt.values())
    for node_id, rgba in saves.items():
        files = comfy_server.output_files(entry, node_id)
        assert files, node_id
        for path in files:
            with Image.open(path) as png:
                assert png.format == "PNG" and png.size == (TINY, TINY)
                assert png.mode == ("RGBA" if rgba else "RGB"), (node_id, png.mode)
                if rgba:
                    alpha = np.asarray(png.getchannel("A"))
                    assert alpha.shape == (TINY, TINY)
    previews = [n for n, node in prompt.items() if node["class_type"] == "PreviewImage"]
    assert all(entry["outputs"][n]["images"] for n in previews)


@pytest.fixture(scope="module")
def sdxl_stand_in(comfy_server) -> str:
    """An empty file under the shipped SDXL checkpoint name: /prompt's validation passes, loading
    it fails (the machine has no room for an SDXL run)."""
    path = comfy_server.base / "models" / "checkpoints" / SDXL_STAND_IN
    path.touch()
    return SDXL_STAND_IN


@pytest.mark.parametrize("name", SDXL_RUNS)
def test_sdxl_api_workflow_passes_the_servers_validation(comfy_server, object_info, workflow_inputs, sdxl_stand_in,
                                                         name):
    prompt = load_api(name)
    require_types(object_info, node_types(prompt))
    assert {n["inputs"]["ckpt_name"] for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"} == \
        {sdxl_stand_in}
    entry = comfy_server.run(prompt)  # asserts that /prompt accepted it
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "CheckpointLoaderSimple", errors
