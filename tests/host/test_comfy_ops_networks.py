"""The pack's networks built from ComfyUI's layers (comfy.ops), as core builds its models: the same
outputs as with torch.nn, and the CPU executor still runs the transparent decoder."""
from __future__ import annotations

import functools
import sys

import pytest
import torch

from support.pack import pack_module

NARROW_CHANNELS = (8, 8, 16, 16, 32, 32, 32)


@pytest.fixture()
def narrow(pack, monkeypatch):
    """A UNet1024 with few channels per block (the structure unchanged), small enough for the CPU."""
    for name in ("lib_layerdiffuse.unet1024", "lib_layerdiffuse.unet1024_cpu"):
        monkeypatch.setattr(pack_module(name), "BLOCK_CHANNELS", NARROW_CHANNELS)


def _ops(kind: str):
    import comfy.ops

    return getattr(comfy.ops, kind)


def _built(factory, state: dict, operations=None):
    return pack_module("lib_layerdiffuse.weight_files").build_model(factory, state, "test", operations=operations)


@pytest.mark.parametrize("kind", ["disable_weight_init", "manual_cast"])
@pytest.mark.parametrize("latent_channels", [4, 16])
def test_decoder_from_comfy_layers_matches_torch_layers(narrow, kind, latent_channels):
    unet1024 = pack_module("lib_layerdiffuse.unet1024")
    executor = pack_module("lib_layerdiffuse.unet1024_cpu")
    torch.manual_seed(0)
    state = unet1024.UNet1024(latent_channels).state_dict()
    torch_net = _built(lambda: unet1024.UNet1024(latent_channels), state)
    comfy_net = _built(functools.partial(unet1024.UNet1024, latent_channels), state, operations=_ops(kind))
    assert isinstance(comfy_net.conv_out, _ops(kind).Conv2d)
    assert isinstance(comfy_net.mid_block.attentions[0].to_q, _ops(kind).Linear)
    pixel, latent = torch.rand(2, 3, 64, 64), torch.randn(2, latent_channels, 8, 8)
    with torch.inference_mode():
        expected = torch_net(pixel, latent)
        assert torch.equal(comfy_net(pixel, latent), expected)
        executor.check_structure(comfy_net)  # the executor recognises the network...
        fast = executor.CpuExecutor(comfy_net)(pixel, latent)  # ...and computes the same from its weights
    assert (fast - expected).abs().max() < 2e-5  # float32 rounding in another order


@pytest.mark.parametrize("latent_channels", [4, 16])
def test_offset_encoder_from_comfy_layers_matches_torch_layers(pack, latent_channels):
    encoder = pack_module("lib_layerdiffuse.offset_encoder").LatentTransparencyOffsetEncoder
    torch.manual_seed(0)
    state = encoder(latent_channels).state_dict()
    torch_net = _built(lambda: encoder(latent_channels), state)
    comfy_net = _built(functools.partial(encoder, latent_channels), state, operations=_ops("disable_weight_init"))
    assert isinstance(comfy_net.blocks[0], _ops("disable_weight_init").Conv2d)
    feed = torch.rand(2, 4, 64, 64)
    with torch.inference_mode():
        assert torch.equal(comfy_net(feed), torch_net(feed))


def test_the_nodes_build_their_networks_from_comfy_layers(pack, tmp_path):
    """model_store.network, which loads every network the nodes run, passes ComfyUI's layers."""
    import comfy.ops
    from safetensors.torch import save_file

    encoder = pack_module("lib_layerdiffuse.offset_encoder").LatentTransparencyOffsetEncoder
    torch.manual_seed(0)
    path = tmp_path / "encoder.safetensors"
    save_file(encoder().state_dict(), str(path))
    network = pack_module("nodes.model_store").network(str(path), encoder, torch.float32).model
    assert all(isinstance(m, comfy.ops.disable_weight_init.Conv2d)
               for m in network.modules() if isinstance(m, torch.nn.Conv2d))


def test_a_file_loads_into_layers_that_make_their_tensors_late(narrow, monkeypatch):
    """With ComfyUI's dynamic VRAM (newer hosts), its Linear has no weight until the file loads: the
    file is still checked against the network's layout, and loads."""
    memory_management = sys.modules.get("comfy.memory_management")  # absent on older hosts: no late tensors
    if memory_management is not None:
        monkeypatch.setattr(memory_management, "aimdo_enabled", True)
    unet1024 = pack_module("lib_layerdiffuse.unet1024")
    errors = pack_module("lib_layerdiffuse.errors")
    torch.manual_seed(0)
    state = unet1024.UNet1024().state_dict()
    torch_net = _built(unet1024.UNet1024, state)
    comfy_net = _built(unet1024.UNet1024, state, operations=_ops("disable_weight_init"))
    pixel, latent = torch.rand(1, 3, 64, 64), torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        assert torch.equal(comfy_net(pixel, latent), torch_net(pixel, latent))
    key = "mid_block.attentions.0.to_q.weight"
    with pytest.raises(errors.WeightFileError, match=f"wrong shapes: {key}"):
        _built(unet1024.UNet1024, {**state, key: torch.zeros(3, 3)}, operations=_ops("disable_weight_init"))
