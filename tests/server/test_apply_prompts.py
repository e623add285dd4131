"""The generation modes through ComfyUI's executor on a live server: the SD1.5 modes in one
graph, and the checkpoint's model unchanged for the next prompt."""
from __future__ import annotations

import json

from support.sd_models import SD15_GOLDENS
from support.server import link_into
from support.synth import synthetic_file

APPLY_NODE_IDS = ["LayeredDiffusionApply", "LayeredDiffusionJointApply", "LayeredDiffusionCondApply",
                  "LayeredDiffusionCondJointApply", "LayeredDiffusionDiffApply"]


def _prompt(nodes: dict) -> dict:
    return {str(k): {"class_type": v[0], "inputs": v[1]} for k, v in nodes.items()}


def _plain_nodes(clip_node):
    return {
        1: ("CheckpointLoaderSimple", {"ckpt_name": "sd15_synthetic.safetensors"}),
        2: ("CLIPTextEncode", {"text": "a glass cup", "clip": clip_node}),
        3: ("CLIPTextEncode", {"text": "", "clip": clip_node}),
        4: ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
        5: ("KSampler", {"model": ["1", 0], "seed": 7, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
                         "latent_image": ["4", 0], "denoise": 1.0}),
        6: ("VAEDecode", {"samples": ["5", 0], "vae": ["1", 2]}),
        7: ("SaveImage", {"images": ["6", 0], "filename_prefix": "plain"}),
    }


def _pixels(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path))


def test_executor_runs_sd15_modes_without_leaking(comfy_server):
    object_info = comfy_server.get("/object_info")
    assert all(n in object_info for n in APPLY_NODE_IDS)
    for _, _, manifest, seed in SD15_GOLDENS.values():
        if manifest == "layer_sd15_bg2fg":
            continue  # the server gets the fg2bg file with seed 0 only; bg2fg is covered in-process
        link_into(comfy_server.base, "layer_model", synthetic_file(manifest, seed=seed))

    fresh = comfy_server.run(_prompt(_plain_nodes(["1", 1])))
    assert fresh["status"]["status_str"] == "success", fresh["status"]

    nodes = {
        **_plain_nodes(["1", 1]),
        10: ("LayeredDiffusionApply", {"model": ["1", 0], "config": "SD15, Attention Injection, attn_sharing",
                                       "weight": 1.0}),
        11: ("LayeredDiffusionJointApply", {"model": ["1", 0], "config": "SD15, attn_sharing, Batch size (3N)",
                                            "fg_cond": ["2", 0], "stop_at": 0.8}),
        12: ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 3}),
        13: ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 2}),
        14: ("LayeredDiffusionCondJointApply", {"model": ["1", 0], "image": ["6", 0],
                                                "config": "SD15, Foreground, attn_sharing, Batch size (2N)",
                                                "blended_cond": ["2", 0]}),
    }
    for node, model, latent, prefix in ((20, "10", "4", "fg"), (30, "11", "12", "joint"), (40, "14", "13", "cond")):
        nodes[node] = ("KSampler", {**nodes[5][1], "model": [model, 0], "latent_image": [latent, 0]})
        nodes[node + 1] = ("VAEDecode", {"samples": [str(node), 0], "vae": ["1", 2]})
        nodes[node + 2] = ("SaveImage", {"images": [str(node + 1), 0], "filename_prefix": prefix})
    del nodes[7]
    layered = comfy_server.run(_prompt(nodes))
    assert layered["status"]["status_str"] == "success", json.dumps(layered["status"])[:3000]
    for node, count in (("22", 1), ("32", 3), ("42", 2)):
        assert len(comfy_server.output_files(layered, node)) == count

    # the same plain generation again; CLIPSetLastLayer(-1) is a no-op that makes the sampler run
    # again on the cached checkpoint model that the layered prompt's clones came from
    again_nodes = {**_plain_nodes(["8", 0]), 8: ("CLIPSetLastLayer", {"clip": ["1", 1], "stop_at_clip_layer": -1})}
    again = comfy_server.run(_prompt(again_nodes))
    assert again["status"]["status_str"] == "success", again["status"]
    cached = [n for kind, data in again["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]]
    assert "1" in cached and "5" not in cached  # same checkpoint model object, sampled anew
    first = _pixels(comfy_server.output_files(fresh, "7")[0])
    second = _pixels(comfy_server.output_files(again, "7")[0])
    assert (first == second).all()
