"""Reading, checking and converting the pack's workflows against a live server's /object_info.

UI format (what ComfyUI saves and drag-and-drop loads): nodes with positional `widgets_values`
and links [id, from node, from slot, to node, to slot, type]. API format (what /prompt takes):
node id -> class_type and named inputs. `ui_to_api` converts the first into the second the way
the frontend does for these graphs, which keeps workflows/api/ in step with workflows/.

Run as a script, against a ComfyUI with the pack, to rewrite the API twins from the UI files
after editing a UI workflow, or the English locale after changing a node's schema:
    python tests/support/workflows.py --server http://127.0.0.1:8188 [NAME ...]
    python tests/support/workflows.py --server http://127.0.0.1:8188 --locale
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Optional

if __package__:
    from .paths import API_DIR, COMPAT_DIR, PACK_ROOT, WORKFLOW_DIR
else:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from paths import API_DIR, COMPAT_DIR, PACK_ROOT, WORKFLOW_DIR

# Frontend-only nodes: never sent to the server.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Widgets the frontend adds after an input and does not send to the server.
EXTRA_WIDGETS = {"control_after_generate": "control_after_generate", "image_upload": "upload"}
# Inputs whose valid values depend on the user's files, not on the node definition.
FILE_INPUTS = {"ckpt_name", "image", "unet_name", "clip_name1", "clip_name2", "vae_name", "lora_name", "model_name"}


# Nodes of other packs that the peer's examples use; not ours to provide.
FOREIGN_NODES = {"ImageResize+"}
APPLY_NODE_IDS = ("LayeredDiffusionApply", "LayeredDiffusionJointApply", "LayeredDiffusionCondApply",
                  "LayeredDiffusionCondJointApply", "LayeredDiffusionDiffApply")
# Nodes whose first output is an RGBA image.
DECODERS = {"LayeredDiffusionDecodeRGBA", "LayeredDiffusionDecodeSplit", "LayeredDiffusionFluxDecode"}


# Workflows built on core nodes that older hosts lack: name -> the nodes (core's and ours) that
# exist only where ComfyUI has the LAYERS type (0.31+).
LAYERS_WORKFLOWS = {"layers_upscale_and_save": {"AddLayer", "LayeredDiffusionUpscaleLayers"}}


def skip_where_the_host_lacks_layers(name: str, info: dict) -> None:
    """Skip a LAYERS workflow on a host without the LAYERS type, after checking that this is the
    only reason: the nodes it lacks are the LAYERS ones, and no node at all has a LAYERS output."""
    import pytest

    missing = {t for t in node_types(load_ui(name)) if t not in info}
    if name not in LAYERS_WORKFLOWS or not missing:
        return
    assert missing <= LAYERS_WORKFLOWS[name], f"{name}: {sorted(missing)} not on the server"
    assert not any("LAYERS" in node.get("output", []) for node in info.values()), \
        f"{name}: the host has the LAYERS type but not {sorted(missing)}"
    pytest.skip(f"{name} needs core's LAYERS nodes (ComfyUI 0.31+); this host has none")


def ui_workflow_names() -> list[str]:
    return sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))


def api_workflow_names() -> list[str]:
    return sorted(p.stem for p in API_DIR.glob("*.json"))


def compat_names() -> list[str]:
    """The peer pack's example workflows (tests/data/compat)."""
    return sorted(p.stem for p in COMPAT_DIR.glob("*.json"))


def load_compat(name: str) -> dict:
    return json.loads((COMPAT_DIR / f"{name}.json").read_text())


def pack_node_ids() -> set[str]:
    """Every node id the pack's node modules define, read from the source."""
    ids = set()
    for path in (PACK_ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "node_id" and isinstance(node.value, ast.Constant):
                ids.add(node.value.value)
    return ids


def require_registered(info: dict, types: Iterable[str]) -> None:
    """Every node type of ours among `types` is registered on the server whose /object_info is `info`."""
    absent = sorted(t for t in types if t not in info and t in pack_node_ids())
    assert not absent, f"{', '.join(absent)} not registered on the live server"


def load_ui(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text())


def load_api(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


def input_spec(node_info: dict, name: str) -> Optional[list]:
    for group in ("required", "optional"):
        if name in node_info["input"].get(group, {}):
            return node_info["input"][group][name]
    return None


def input_order(node_info: dict) -> list[str]:
    order = node_info.get("input_order") or {g: list(node_info["input"].get(g, {})) for g in ("required", "optional")}
    return list(order.get("required", [])) + list(order.get("optional", []))


def is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def widget_slots(node_info: dict) -> list[tuple[str, bool]]:
    """(name, sent to the server) for each entry of a node's `widgets_values`, in order."""
    slots = []
    for name in input_order(node_info):
        spec = input_spec(node_info, name)
        if spec is None or not is_widget(spec):
            continue
        slots.append((name, True))
        options = spec[1] if len(spec) > 1 else {}
        for option, extra in EXTRA_WIDGETS.items():
            if options.get(option):
                slots.append((extra, False))
    return slots


def node_types(workflow: dict) -> set[str]:
    if "nodes" in workflow:
        return {n["type"] for n in workflow["nodes"] if n["type"] not in VIRTUAL_NODES}
    return {n["class_type"] for n in workflow.values()}


def ui_to_api(graph: dict, info: dict) -> dict:
    """The API prompt the frontend would queue for a UI graph of real nodes and plain links."""
    links = {link[0]: link for link in graph["links"]}
    prompt = {}
    for node in graph["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']} ({node['type']}) is muted or bypassed; shipped workflows should not be")
        node_info = info[node["type"]]
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        slots = widget_slots(node_info)
        if len(values) != len(slots):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values for "
                             f"{[name for name, _ in slots]}")
        for (name, sent), value in zip(slots, values):
            if sent:
                inputs[name] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        ordered = {name: inputs[name] for name in input_order(node_info) if name in inputs}
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": ordered,
                                   "_meta": {"title": node.get("title") or node_info["display_name"]}}
    return prompt


def check_value(spec: list, value: Any) -> Optional[str]:
    """Why `value` does not fit a widget input's spec, or None."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        return None if value in choices else f"{value!r} is not one of {choices}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and not isinstance(value, int)):
            return f"{value!r} is not {kind}"
        if value < options.get("min", value) or value > options.get("max", value):
            return f"{value} is outside [{options.get('min')}, {options.get('max')}]"
        return None
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    return None


def check_api(prompt: dict, info: dict, ignore_types: Iterable[str] = ()) -> list[str]:
    """Problems of an API prompt against /object_info: unknown nodes, missing required inputs,
    link types, widget values (file names excepted), and no output node."""
    problems, ignore = [], set(ignore_types)
    for node_id, node in prompt.items():
        class_type = node["class_type"]
        if class_type in ignore:
            continue
        if class_type not in info:
            problems.append(f"{node_id}: unknown node type {class_type}")
            continue
        node_info = info[class_type]
        for name in node_info["input"].get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"{node_id} ({class_type}): required input {name} is missing")
        for name, value in node["inputs"].items():
            spec = input_spec(node_info, name)
            if spec is None:
                problems.append(f"{node_id} ({class_type}): no input called {name}")
            elif isinstance(value, list):
                source, slot = value
                if source not in prompt:
                    problems.append(f"{node_id} ({class_type}).{name}: links to missing node {source}")
                elif prompt[source]["class_type"] in info:
                    outputs = info[prompt[source]["class_type"]]["output"]
                    if slot >= len(outputs) or outputs[slot] != spec[0]:
                        problems.append(f"{node_id} ({class_type}).{name}: {spec[0]} input fed by "
                                        f"{prompt[source]['class_type']} output {slot}")
            elif name not in FILE_INPUTS:
                why = check_value(spec, value)
                if why:
                    problems.append(f"{node_id} ({class_type}).{name}: {why}")
    if not any(info.get(n["class_type"], {}).get("output_node") for n in prompt.values()):
        problems.append("no output node")
    return problems


def optional_inputs(node_info: dict) -> set[str]:
    return set(node_info["input"].get("optional", {}))


def check_ui(graph: dict, info: dict, ignore_types: Iterable[str] = (), strict_widgets: bool = True) -> list[str]:
    """Problems of a UI graph against /object_info: unknown node types, widget counts and values,
    slot and link types, and link bookkeeping. With strict_widgets=False a node may lack values
    for trailing optional inputs (workflows saved before those inputs existed: the frontend
    gives them their defaults)."""
    problems, ignore = [], set(ignore_types) | VIRTUAL_NODES
    nodes = {n["id"]: n for n in graph["nodes"]}
    links = {link[0]: link for link in graph["links"]}
    if len(nodes) != len(graph["nodes"]):
        problems.append("duplicate node ids")
    if len(links) != len(graph["links"]):
        problems.append("duplicate link ids")
    if nodes and graph.get("last_node_id", 0) < max(nodes):
        problems.append("last_node_id is below the largest node id")
    if links and graph.get("last_link_id", 0) < max(links):
        problems.append("last_link_id is below the largest link id")
    for link_id, origin, out_slot, target, in_slot, link_type in graph["links"]:
        if origin not in nodes or target not in nodes:
            problems.append(f"link {link_id} joins missing nodes")
            continue
        target_inputs = nodes[target].get("inputs", [])
        if in_slot >= len(target_inputs) or target_inputs[in_slot].get("link") != link_id:
            problems.append(f"link {link_id} is not recorded on node {target}'s input {in_slot}")
        origin_outputs = nodes[origin].get("outputs", [])
        if out_slot >= len(origin_outputs) or link_id not in (origin_outputs[out_slot].get("links") or []):
            problems.append(f"link {link_id} is not recorded on node {origin}'s output {out_slot}")
    for node in graph["nodes"]:
        where = f"{node['id']} ({node['type']})"
        if node["type"] in ignore:
            continue
        if node["type"] not in info:
            problems.append(f"{where}: unknown node type")
            continue
        node_info = info[node["type"]]
        slots = widget_slots(node_info)
        values = list(node.get("widgets_values") or [])
        if not strict_widgets and len(values) < len(slots) and all(
                name in optional_inputs(node_info) or not sent for name, sent in slots[len(values):]):
            slots = slots[:len(values)]
        if len(values) != len(slots):
            problems.append(f"{where}: {len(values)} widget values for {[name for name, _ in slots]}")
        else:
            for (name, sent), value in zip(slots, values):
                if sent and name not in FILE_INPUTS:
                    why = check_value(input_spec(node_info, name), value)
                    if why:
                        problems.append(f"{where}.{name}: {why}")
        for slot in node.get("inputs", []):
            spec = input_spec(node_info, slot["name"])
            if spec is None:
                problems.append(f"{where}: no input called {slot['name']}")
                continue
            if not is_widget(spec) and spec[0] != slot["type"]:
                problems.append(f"{where}.{slot['name']}: slot type {slot['type']}, server says {spec[0]}")
            if slot.get("link") is not None:
                link = links.get(slot["link"])
                if link is None:
                    problems.append(f"{where}.{slot['name']}: link {slot['link']} does not exist")
                    continue
                source = nodes.get(link[1])
                if source is not None and source["type"] in info:
                    outputs = info[source["type"]]["output"]
                    if link[2] >= len(outputs) or outputs[link[2]] != spec[0]:
                        problems.append(f"{where}.{slot['name']}: fed by {source['type']} output {link[2]}, "
                                        f"which is not {spec[0]}")
        for index, out in enumerate(node.get("outputs", [])):
            if index >= len(node_info["output"]) or node_info["output"][index] != out["type"]:
                problems.append(f"{where}: output {index} is {out['type']}, server says "
                                f"{node_info['output'][index] if index < len(node_info['output']) else 'nothing'}")
    return problems


def locale_node_defs(info: dict, node_ids: Iterable[str]) -> dict:
    """nodeDefs entries (the frontend's locales/<lang>/nodeDefs.json format) for `node_ids`,
    in English, from their /object_info definitions."""
    defs = {}
    for node_id in sorted(node_ids):
        node_info = info[node_id]
        entry: dict[str, Any] = {"display_name": node_info["display_name"]}
        if node_info.get("description"):
            entry["description"] = node_info["description"]
        inputs = {}
        for name in input_order(node_info):
            spec = input_spec(node_info, name)
            tooltip = (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}).get("tooltip")
            inputs[name] = {"name": name, **({"tooltip": tooltip} if tooltip else {})}
        if inputs:
            entry["inputs"] = inputs
        tooltips = node_info.get("output_tooltips") or [None] * len(node_info["output"])
        outputs = {str(i): {"name": name, **({"tooltip": tip} if tip else {})}
                   for i, (name, tip) in enumerate(zip(node_info["output_name"], tooltips))}
        if outputs:
            entry["outputs"] = outputs
        defs[node_id] = entry
    return defs


def main() -> None:
    parser = argparse.ArgumentParser(description="Rewrite workflows/api/*.json from workflows/*.json, and "
                                     "locales/en/nodeDefs.json from the node definitions (--locale).")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="a ComfyUI with this pack installed")
    parser.add_argument("--locale", action="store_true", help="rewrite locales/en/nodeDefs.json instead")
    parser.add_argument("names", nargs="*", help="workflow names (default: all)")
    args = parser.parse_args()
    with urllib.request.urlopen(args.server.rstrip("/") + "/object_info", timeout=60) as response:
        info = json.loads(response.read())
    if args.locale:
        ours = [k for k, v in info.items() if v.get("python_module", "").startswith("custom_nodes.")
                and k.startswith("LayeredDiffusion")]
        path = PACK_ROOT / "locales" / "en" / "nodeDefs.json"
        path.write_text(json.dumps(locale_node_defs(info, ours), indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {path.relative_to(PACK_ROOT)} ({len(ours)} nodes)")
        return
    for name in args.names or ui_workflow_names():
        prompt = ui_to_api(load_ui(name), info)
        problems = check_api(prompt, info)
        if problems:
            raise SystemExit(f"{name}: " + "; ".join(problems))
        (API_DIR / f"{name}.json").write_text(json.dumps(prompt, indent=2) + "\n")
        print(f"wrote workflows/api/{name}.json")


if __name__ == "__main__":
    main()
