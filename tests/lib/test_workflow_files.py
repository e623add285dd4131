"""The shipped workflow files and the install metadata, read as files: every UI workflow has its
API twin, every generation mode has a workflow, the UI workflows follow the pack's conventions
(notes, model links, layout, saves, thumbnails), pyproject.toml and requirements.txt agree.
Checks against a live server are in server/test_workflows_live.py."""
from __future__ import annotations

import re

import pytest

from lib_layerdiffuse.weight_files import OFFICIAL_REPO, WEIGHT_FILES
from support.paths import PACK_ROOT, WORKFLOW_DIR
from support.workflow_runs import at_size, size_nodes
from support.workflows import (
    APPLY_NODE_IDS,
    DECODERS,
    api_workflow_names,
    load_api,
    load_ui,
    node_types,
    ui_workflow_names,
)

UI_NAMES = ui_workflow_names()
LAYER_DIFFUSE_NAMES = [n for n in UI_NAMES if n.startswith(("sd15_", "sdxl_"))]
# Workflows for any RGBA image (no generation).
TOOL_NAMES = ["layers_upscale_and_save", "rgba_upscale_with_model"]


def test_every_ui_workflow_has_an_api_twin():
    assert UI_NAMES == api_workflow_names()
    assert len(LAYER_DIFFUSE_NAMES) >= 14
    assert set(UI_NAMES) == set(LAYER_DIFFUSE_NAMES) | {n for n in UI_NAMES if n.startswith("flux_")} | set(TOOL_NAMES)


@pytest.mark.parametrize("name", UI_NAMES)
def test_the_size_is_set_in_one_place(name):
    """One node sets width and height; every other size is linked to it (Get Image Size) or
    follows a factor, or the input images give the size. Changing that one place changes them all."""
    prompt = load_api(name)
    assert len(size_nodes(prompt)) <= 1, size_nodes(prompt)
    changed = at_size(load_api(name), (96, 64))
    assert len(size_nodes(changed)) <= 1
    literal = [(k, node["inputs"][k]) for node in changed.values() for k in ("width", "height")
               if isinstance(node["inputs"].get(k), int) and node["inputs"][k] > 0]
    assert sorted(literal) in ([], [("height", 64), ("width", 96)])
    # The UI file likewise: the width widgets not fed by a link, above 0.
    width_widget = {"EmptyLatentImage": 0, "EmptySD3LatentImage": 0, "ImageScale": 1, "LayeredDiffusionUpscaleRGBA": 2}
    graph = load_ui(name)
    set_here = [n for n in graph["nodes"] if n["type"] in width_widget and n["widgets_values"][width_widget[n["type"]]] > 0
                and not any(s["name"] == "width" and s.get("link") is not None for s in n.get("inputs", []))]
    assert len(set_here) <= 1, [n["id"] for n in set_here]


@pytest.mark.parametrize("name", TOOL_NAMES)
def test_tool_workflow_conventions(name):
    """Notes with the size, batch, files and memory, the RGBA result saved as a layered file, a
    thumbnail; models with their download links."""
    graph = load_ui(name)
    text = "\n".join(n["widgets_values"][0] for n in graph["nodes"] if n["type"] in ("Note", "MarkdownNote"))
    assert "Size" in text and "Batch" in text and "Files" in text and "Memory" in text
    for model in graph.get("models", []):
        assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith(model["name"])
        assert model["name"] in text
    saves = [n for n in graph["nodes"] if n["type"] == "LayeredDiffusionSaveLayers"]
    assert saves and all(any(s["link"] is not None for s in n["inputs"]) for n in saves)
    assert (WORKFLOW_DIR / f"{name}.jpg").is_file(), "no thumbnail for the template browser"


def test_every_generation_mode_has_a_workflow():
    configs = {(node["type"], value) for name in UI_NAMES for node in load_ui(name)["nodes"]
               if node["type"] in APPLY_NODE_IDS for value in node["widgets_values"] if isinstance(value, str)}
    source = (PACK_ROOT / "nodes" / "modes.py").read_text()
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
    models = graph.get("models", [])
    layer_files = [m for m in models if m["directory"] == "layer_model"]
    assert layer_files, "no LayerDiffuse weight in the workflow's models list"
    for model in models:
        assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith(model["name"])
        assert model["name"].endswith(".safetensors"), "ComfyUI's download dialog only takes .safetensors"
        assert model["name"] in text, f"the notes should name {model['name']}"
    for model in layer_files:
        official = f"https://huggingface.co/{OFFICIAL_REPO}/resolve/main/{model['name']}"
        assert model["url"] == WEIGHT_FILES[model["name"]].url == official
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


def test_install_metadata():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    project = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())
    meta = project["project"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", meta["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert (PACK_ROOT / meta["license"]["file"]).is_file()
    assert meta["description"] and meta["requires-python"]
    # The registry id is not the peer pack's ("comfyui-layerdiffuse") and, as the registry asks,
    # does not contain "comfyui"; the supported host range is stated.
    assert "comfyui" not in meta["name"].lower()
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
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


LAYERED_WORKFLOWS = ["sd15_joint_fg_bg_blend", "sd15_cond_joint_fg_to_bg", "sd15_cond_joint_bg_to_fg",
                     "sdxl_cond_fg_to_blend", "sdxl_cond_bg_to_blend_and_fg", "sdxl_diff_fg_blend_to_bg",
                     "sdxl_diff_bg_blend_to_fg"]


@pytest.mark.parametrize("name", LAYERED_WORKFLOWS)
def test_layered_workflows_end_in_the_layered_save(name):
    """Every layered mode's workflow saves its layers as PNGs and a layered file: the generated
    layers and the given ones, foreground always among them."""
    graph = load_ui(name)
    saves = [n for n in graph["nodes"] if n["type"] == "LayeredDiffusionSaveLayers"]
    assert len(saves) == 1
    connected = {slot["name"] for slot in saves[0]["inputs"] if slot["link"] is not None}
    assert "foreground" in connected and len(connected) >= 2
    assert saves[0]["widgets_values"][1] == "PSD + OpenRaster"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_hires_fix_workflows_upscale_encode_and_sample_again(family):
    """RGBA result -> Upscale (RGBA) x2 -> Encode (RGBA) -> KSampler at denoise 0.4-0.6 with the same
    LayerDiffuse model -> Decode (RGBA)."""
    graph = load_ui(f"{family}_transparent_hires_fix")
    nodes = {n["id"]: n for n in graph["nodes"]}
    links = {link[0]: link for link in graph["links"]}

    def source(node, input_name):
        slot = next(s for s in node["inputs"] if s["name"] == input_name)
        return nodes[links[slot["link"]][1]]

    samplers = [n for n in graph["nodes"] if n["type"] == "KSampler"]
    second = next(n for n in samplers if source(n, "latent_image")["type"] == "LayeredDiffusionEncode")
    assert 0.4 <= second["widgets_values"][6] <= 0.6
    assert {source(n, "model")["type"] for n in samplers} == {"LayeredDiffusionApply"}
    assert len({source(n, "model")["id"] for n in samplers}) == 1  # the same mode in both passes
    upscale = source(source(second, "latent_image"), "image")
    assert upscale["type"] == "LayeredDiffusionUpscaleRGBA" and upscale["widgets_values"][1:4] == [2.0, 0, 0]
    assert source(upscale, "image")["type"] == "LayeredDiffusionDecodeRGBA"
    final = [n for n in graph["nodes"] if n["type"] == "LayeredDiffusionDecodeRGBA" and source(n, "samples") is second]
    assert len(final) == 1
