"""A weight file replaced on disk while ComfyUI runs is read again, not served from the pack's
cache of loaded networks nor from ComfyUI's cache of node outputs."""
from __future__ import annotations

import collections
import os

import torch

from support.pack import pack_module, run_node
from support.synth import synthetic_file

DECODER = "layer_sd15_vae_transparent_decoder"


def _replace(link: os.PathLike, source: os.PathLike) -> None:
    """Point `link` at `source` in one step, as a user who moves a new file over the old one."""
    staged = f"{link}.new"
    os.symlink(source, staged)
    os.replace(staged, link)


def test_replaced_decoder_file_is_read_again(pack, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model", ([str(tmp_path)], {".safetensors"}))
    first, second = synthetic_file(DECODER, seed=0), synthetic_file(DECODER, seed=1)
    link = tmp_path / first.name
    link.symlink_to(first)
    node = pack.NODE_CLASS_MAPPINGS["LayeredDiffusionDecodeRGBA"]
    torch.manual_seed(0)
    inputs = dict(samples={"samples": torch.randn(1, 4, 8, 8)}, images=torch.rand(1, 64, 64, 3),
                  sd_version="SD15", sub_batch_size=1, passes="1")

    before, before_fingerprint = run_node(pack, node.__name__, **inputs)[0], node.fingerprint_inputs(sd_version="SD15")
    assert node.fingerprint_inputs(sd_version="SD15") == before_fingerprint  # unchanged file: ComfyUI may reuse
    _replace(link, second)
    assert node.fingerprint_inputs(sd_version="SD15") != before_fingerprint  # replaced: ComfyUI runs the node again
    after = run_node(pack, node.__name__, **inputs)[0]
    assert not torch.equal(after, before)

    # What a fresh process (no network loaded yet) makes of the new file.
    monkeypatch.setattr(pack_module("nodes.model_store"), "_networks", collections.OrderedDict())
    assert torch.equal(run_node(pack, node.__name__, **inputs)[0], after)

    _replace(link, first)
    assert torch.equal(run_node(pack, node.__name__, **inputs)[0], before)


def test_apply_nodes_fingerprint_the_file_their_config_reads(pack, tmp_path, monkeypatch):
    """A patched MODEL made from the old file is not reused once the file is replaced."""
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model", ([str(tmp_path)], {".safetensors"}))
    node = pack.NODE_CLASS_MAPPINGS["LayeredDiffusionApply"]
    config = "SD15, Attention Injection, attn_sharing"
    missing = node.fingerprint_inputs(config=config)
    assert missing == (None,)
    link = tmp_path / "layer_sd15_transparent_attn.safetensors"
    link.symlink_to(synthetic_file("layer_sd15_transparent_attn"))
    present = node.fingerprint_inputs(config=config)
    assert present != missing and node.fingerprint_inputs(config=config) == present
    _replace(link, synthetic_file(DECODER))
    assert node.fingerprint_inputs(config=config) != present
    # A config that comes from another node (None here): every file the node may read counts.
    assert len(node.fingerprint_inputs(config=None)) == len(pack_module("nodes.modes").APPLY_MODES)


def test_flux_nodes_fingerprint_the_files_they_read(pack, tmp_path, monkeypatch):
    """The Flux LoRA and TransparentVAE (either form) count for the nodes that read them."""
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model",
                        ([str(tmp_path)], {".safetensors", ".pth"}))
    apply = pack.NODE_CLASS_MAPPINGS["LayeredDiffusionFluxApply"]
    readers = [pack.NODE_CLASS_MAPPINGS[name] for name in
               ("LayeredDiffusionFluxVAELoader", "LayeredDiffusionFluxDecode", "LayeredDiffusionFluxEncode")]
    assert apply.fingerprint_inputs(strength=1.0) == (None,)
    lora = tmp_path / "layerlora.safetensors"
    lora.symlink_to(synthetic_file("layer_sd15_transparent_attn"))
    present = apply.fingerprint_inputs(strength=1.0)
    assert present != (None,)
    _replace(lora, synthetic_file(DECODER))
    assert apply.fingerprint_inputs(strength=1.0) != present

    fingerprints = {node.fingerprint_inputs() for node in readers}
    assert fingerprints == {(None, None)}
    converted = tmp_path / "TransparentVAE.safetensors"
    converted.symlink_to(synthetic_file(DECODER))
    fingerprints = {node.fingerprint_inputs() for node in readers}
    assert len(fingerprints) == 1 and fingerprints != {(None, None)}
    _replace(converted, synthetic_file("layer_sd15_transparent_attn"))
    assert {node.fingerprint_inputs() for node in readers}.isdisjoint(fingerprints)
