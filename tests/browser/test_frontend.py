"""ComfyUI's real frontend, served by the live test server, in headless Chromium: every shipped
workflow loads as drag-and-drop loads it, with no missing node type, its widget values intact and
its missing weights offered for download; an unknown node is reported. Screenshots go to the
test's tmp_path. The page runs the frontend installed beside the server, and the release named by
LAYERDIFFUSE_FRONTEND when that is set (CI's lane for the newest frontend sets it).

Needs Debian's `chromium` and `chromium-driver` (skipped with that reason otherwise).
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import urllib.request
from pathlib import Path

import pytest

from support.browser import Browser, close_dialogs, drop_workflow, find_browser, load_template, open_template_category
from support.environment import unavailable
from support.paths import COMPAT_DIR, PACK_ROOT, WORKFLOW_DIR
from support.workflows import (
    FOREIGN_NODES,
    VIRTUAL_NODES,
    compat_names,
    load_ui,
    node_types,
    require_registered,
    skip_where_the_host_lacks_layers,
    ui_workflow_names,
)

PAGE_READY = ("window.app && window.app.graph && window.LiteGraph && "
              "window.LiteGraph.registered_node_types['LayeredDiffusionDecodeRGBA'] && true")


@pytest.fixture(scope="module")
def browser(comfy_server, tmp_path_factory):
    chromium, driver, why = find_browser()
    if why:
        unavailable(why)
    folder = tmp_path_factory.mktemp("chromium")
    # A new user is greeted with the template browser; start from the plain canvas instead.
    request = urllib.request.Request(f"{comfy_server.url}/settings/Comfy.TutorialCompleted", data=b"true",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 200
    session = Browser(chromium, driver, folder / "profile", folder / "chromedriver.log")
    try:
        session.open(comfy_server.url + "/")
        session.wait_for(PAGE_READY)
        yield session
    finally:
        session.quit()


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get("/object_info")


def server_models(comfy_server, folder: str) -> set[str]:
    with urllib.request.urlopen(f"{comfy_server.url}/api/experiment/models/{folder}") as response:
        return {m["name"] for m in json.loads(response.read())}


def same_value(saved, loaded) -> bool:
    if isinstance(saved, (int, float)) and isinstance(loaded, (int, float)) and not isinstance(saved, bool):
        return math.isclose(saved, loaded, rel_tol=1e-9, abs_tol=1e-9)
    return saved == loaded


def named_by_widgets(graph: dict) -> set[str]:
    """The string values of the nodes' widgets (model files among them)."""
    values = set()
    for node in graph["nodes"]:
        saved = node.get("widgets_values") or []
        values.update(v for v in (saved.values() if isinstance(saved, dict) else saved) if isinstance(v, str))
    return values


def test_page_runs_the_installed_frontend(browser):
    served = browser.run("return window.__COMFYUI_FRONTEND_VERSION__;")
    assert served == importlib.metadata.version("comfyui-frontend-package")
    assert served == os.environ.get("LAYERDIFFUSE_FRONTEND", served)


def test_template_browser_offers_the_workflows_with_thumbnails(browser, comfy_server, object_info, tmp_path):
    module = PACK_ROOT.name
    titles = json.loads((PACK_ROOT / "locales" / "en" / "main.json").read_text())["templateWorkflows"]["category"]
    # The category is titled from locales/en/main.json when the pack's folder has its registry name.
    label = titles.get(module, module)
    shown = open_template_category(browser, label)
    browser.screenshot(tmp_path / "template_browser.png")
    assert sorted(shown["cards"]) == ui_workflow_names()
    thumbnails = [width for src, width in shown["images"]]
    assert thumbnails and set(thumbnails) == {512}, shown["images"]  # our .jpg files, not a fallback
    loaded = load_template(browser, "sd15_transparent_decode")
    assert loaded["missing"] == []
    assert sorted(loaded["types"]) == sorted(n["type"] for n in load_ui("sd15_transparent_decode")["nodes"])
    close_dialogs(browser)


@pytest.mark.parametrize("name", ui_workflow_names())
def test_shipped_workflow_loads_by_drag_and_drop(browser, comfy_server, object_info, tmp_path, name):
    skip_where_the_host_lacks_layers(name, object_info)
    graph = load_ui(name)
    require_registered(object_info, node_types(graph))
    close_dialogs(browser)
    result = drop_workflow(browser, WORKFLOW_DIR / f"{name}.json")
    browser.screenshot(tmp_path / f"{name}.png")
    reported = result["reported"]
    assert result["missing"] == []
    assert reported["missing_nodes"] == ""
    assert sorted(result["types"]) == sorted(n["type"] for n in graph["nodes"])
    for node in graph["nodes"]:
        loaded = result["widgets"][str(node["id"])]
        saved = node.get("widgets_values") or []
        assert len(loaded) >= len(saved), (node["type"], loaded)
        assert all(same_value(s, v) for s, v in zip(saved, loaded)), (node["type"], saved, loaded)
    # ComfyUI offers every weight of the workflow's list that the server lacks for download into its
    # folder. The Errors tab looks only at the files that widgets name (the list gives their URLs and
    # folders), so the LayerDiffuse files, chosen by the nodes' config and fetched by the nodes on
    # first use, are not among them there; the dialog of frontend 1.35 offers the whole list.
    models = {(m["directory"], m["name"]) for m in graph.get("models", [])}
    lacking = {(d, n) for d, n in models if n not in server_models(comfy_server, d)}
    if reported["ui"] == "errors_tab":
        lacking = {(d, n) for d, n in lacking if n in named_by_widgets(graph)}
    offered = {(folder, file) for folder, file, download in reported["models"] if download}
    assert lacking or not models, "every shipped workflow with files names a base model that the test server lacks"
    assert lacking <= offered <= models, (lacking, reported["models"])


def test_unknown_node_is_reported(browser, tmp_path):
    graph = load_ui("sd15_transparent_decode")
    node = next(n for n in graph["nodes"] if n["type"] == "LayeredDiffusionCheckerboard")
    node["type"] = "LayeredDiffusionNoSuchNode"
    close_dialogs(browser)
    result = drop_workflow(browser, Path("unknown_node.json"), json.dumps(graph))
    browser.screenshot(tmp_path / "unknown_node.png")
    assert result["missing"] == ["LayeredDiffusionNoSuchNode"]
    assert "LayeredDiffusionNoSuchNode" in result["reported"]["missing_nodes"], result["reported"]
    close_dialogs(browser)


@pytest.mark.parametrize("name", compat_names())
def test_peer_workflow_loads_with_only_foreign_nodes_missing(browser, object_info, tmp_path, name):
    path = COMPAT_DIR / f"{name}.json"
    graph = json.loads(path.read_text())
    require_registered(object_info, node_types(graph) - FOREIGN_NODES)
    close_dialogs(browser)
    result = drop_workflow(browser, path)
    browser.screenshot(tmp_path / f"{name}.png")
    assert sorted(set(result["missing"])) == sorted(node_types(graph) & FOREIGN_NODES)
    for node in graph["nodes"]:
        if node["type"] in FOREIGN_NODES | VIRTUAL_NODES:
            continue
        saved = node.get("widgets_values") or []
        loaded = result["widgets"][str(node["id"])]
        assert all(same_value(s, v) for s, v in zip(saved, loaded)), (node["type"], saved, loaded)
    close_dialogs(browser)
