"""The five Apply nodes as ComfyUI registers them: drop-in for the peer's saved workflows (ids,
sockets, widget values), tooltips, and family errors that name both families."""
from __future__ import annotations

import pytest

from support.workflows import APPLY_NODE_IDS, compat_names, load_compat


def _workflow_nodes():
    for name in compat_names():
        for node in load_compat(name)["nodes"]:
            if node["type"] in APPLY_NODE_IDS:
                yield name, node


@pytest.mark.registration
def test_peer_workflows_keep_their_widgets(apply_module):
    classes = {cls.define_schema().node_id: cls for cls in apply_module.APPLY_NODES}
    assert sorted(classes) == sorted(APPLY_NODE_IDS)
    seen = set()
    for name, node in _workflow_nodes():
        schema = classes[node["type"]].define_schema()
        link_types = {"MODEL", "CONDITIONING", "LATENT", "IMAGE"}
        sockets = [i for i in schema.inputs if i.get_io_type() in link_types]
        widgets = [i for i in schema.inputs if i.get_io_type() not in link_types]
        assert [i.id for i in sockets] == [i["name"] for i in node["inputs"]], name
        values = node["widgets_values"]
        assert len(widgets) >= len(values)
        for widget, value in zip(widgets, values):
            if widget.get_io_type() == "COMBO":
                assert value in widget.options, (name, value)
            else:
                assert widget.min <= value <= widget.max
        for extra in widgets[len(values):]:  # inputs added after the peer's: optional, with defaults
            assert extra.optional and extra.default is not None
        assert [o.get_io_type() for o in schema.outputs] == [o["type"] for o in node["outputs"]], name
        seen.add(node["type"])
    assert seen == set(APPLY_NODE_IDS)


@pytest.mark.registration
def test_every_node_has_tooltips(apply_module):
    for cls in apply_module.APPLY_NODES:
        schema = cls.define_schema()
        assert schema.category == "layer_diffuse"
        for item in list(schema.inputs) + list(schema.outputs):
            assert item.tooltip, f"{schema.node_id}.{item.id} has no tooltip"




def test_validation_names_an_unknown_config_and_a_missing_file(pack, tmp_path, monkeypatch):
    """validate_inputs: an unknown config is named with the node's configs, a missing file offline
    says what to download, a value from another node (None) is left to execution."""
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model", ([str(tmp_path)], {".safetensors"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nodes = pack.NODE_CLASS_MAPPINGS
    problem = nodes["LayeredDiffusionApply"].validate_inputs(config="SD3, Attention Injection")
    assert problem.startswith("config must be one of SDXL, Attention Injection, ")
    assert problem.endswith(", not 'SD3, Attention Injection'")
    problem = nodes["LayeredDiffusionCondApply"].validate_inputs(config="SDXL, Foreground")
    assert "layer_xl_fg2ble.safetensors" in problem and str(tmp_path) in problem
    assert nodes["LayeredDiffusionDiffApply"].validate_inputs(config=None) is True
