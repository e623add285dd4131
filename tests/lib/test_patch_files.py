"""SDXL patch files without the host: parsing, key/shape checks, padding and the patched weight."""
from __future__ import annotations

import pytest
import torch

from lib_layerdiffuse.patch_files import (
    DIFF, LORA, PatchFileError, WeightPatch, check_against_model, input_channels, pad_to,
    parse_patch_file, patched_weight)

from support.synth import meta_state

SDXL_PATCH_MANIFESTS = ["layer_xl_transparent_attn", "layer_xl_transparent_conv", "layer_xl_fg2ble",
                        "layer_xl_bg2ble", "layer_xl_fgble2bg", "layer_xl_bgble2fg"]
Q = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
CONV_IN = "diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize("stem", SDXL_PATCH_MANIFESTS)
def test_every_manifest_parses(stem):
    state = meta_state(stem)
    patches = parse_patch_file(state, stem)
    lora_entries = sum(1 for k in state if "::lora::" in k)
    assert len(patches) == lora_entries // 2 + sum(1 for k in state if "::diff::" in k)
    kinds = {p.kind for p in patches}
    assert kinds == ({LORA} if stem == "layer_xl_transparent_attn" else {DIFF})
    expected_in = {"layer_xl_fg2ble": 8, "layer_xl_bg2ble": 8, "layer_xl_fgble2bg": 12,
                   "layer_xl_bgble2fg": 12, "layer_xl_transparent_conv": 4}.get(stem)
    assert input_channels(patches, CONV_IN) == expected_in


def test_lora_pairs_up_and_down():
    up, down = torch.randn(8, 3), torch.randn(3, 5)
    (p,) = parse_patch_file({f"{Q}::lora::0": up, f"{Q}::lora::1": down})
    assert p.kind == LORA and p.up is up and p.down is down and p.alpha is None
    assert p.delta_shape() == (8, 5)


def test_lora_alpha_scales_by_rank():
    up, down, base = torch.randn(8, 4), torch.randn(4, 5), torch.randn(8, 5)
    (p,) = parse_patch_file({f"{Q}::lora::0": up, f"{Q}::lora::1": down, f"{Q}::lora::2": torch.tensor(2.0)})
    assert torch.allclose(patched_weight(base, p, 0.5), base + 0.5 * (2.0 / 4) * up @ down)


@pytest.mark.parametrize("state,message", [
    ({"model.weight": torch.zeros(1)}, "not a LayerDiffuse patch file"),
    ({"k.weight::lokr::0": torch.zeros(1)}, "not a LayerDiffuse patch file"),
    ({"k.weight::lora::0": torch.zeros(2, 2)}, "needs index 0 (up) and 1 (down)"),
    ({"k.weight::lora::0": torch.zeros(2, 3), "k.weight::lora::1": torch.zeros(2, 2)}, "do not multiply"),
    ({"k.weight::diff::1": torch.zeros(2)}, "exactly index 0"),
    ({"k.weight::diff::0": torch.zeros(2), "k.weight::lora::0": torch.zeros(2, 1),
      "k.weight::lora::1": torch.zeros(1, 2)}, "both a lora and a diff"),
    ({}, "holds no patches"),
])
def test_malformed_files_are_errors(state, message):
    with pytest.raises(PatchFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_patch_file(state, "bad.safetensors")


def test_unknown_key_is_an_error_naming_it():
    patches = parse_patch_file({"diffusion_model.nope.weight::diff::0": torch.zeros(3),
                                f"{CONV_IN}::diff::0": torch.zeros(320, 4, 3, 3)})
    with pytest.raises(PatchFileError, match=r"diffusion_model\.nope\.weight") as error:
        check_against_model(patches, {CONV_IN: (320, 4, 3, 3)}, "layer_xl_x.safetensors")
    assert "layer_xl_x.safetensors" in str(error.value) and "1 of its 2" in str(error.value)


@pytest.mark.parametrize("patch,shape,ok", [
    (WeightPatch(CONV_IN, DIFF, diff=torch.zeros(320, 8, 3, 3)), (320, 4, 3, 3), True),  # wider: padded
    (WeightPatch(CONV_IN, DIFF, diff=torch.zeros(320, 2, 3, 3)), (320, 4, 3, 3), False),  # narrower
    (WeightPatch(CONV_IN, DIFF, diff=torch.zeros(320, 4, 3)), (320, 4, 3, 3), False),
    (WeightPatch(Q, LORA, up=torch.zeros(640, 4), down=torch.zeros(4, 640)), (640, 640), True),
    (WeightPatch(Q, LORA, up=torch.zeros(640, 4), down=torch.zeros(4, 320)), (640, 640), False),
    (WeightPatch(CONV_IN, LORA, up=torch.zeros(320, 4), down=torch.zeros(4, 4, 3, 3)), (320, 4, 3, 3), True),
])
def test_shape_checks(patch, shape, ok):
    key_shapes = {patch.key: shape}
    if ok:
        check_against_model([patch], key_shapes)
    else:
        with pytest.raises(PatchFileError, match="do not fit"):
            check_against_model([patch], key_shapes)


def test_pad_keeps_the_weight_and_zero_fills():
    weight = torch.randn(3, 4, 3, 3)
    padded = pad_to(weight, (3, 8, 3, 3))
    assert torch.equal(padded[:, :4], weight) and torch.count_nonzero(padded[:, 4:]) == 0
    assert pad_to(weight, weight.shape) is weight


def test_patched_weight_diff_padded_and_scaled():
    weight, diff = torch.randn(3, 4, 3, 3), torch.randn(3, 12, 3, 3)
    out = patched_weight(weight, WeightPatch(CONV_IN, DIFF, diff=diff), 0.7)
    assert out.shape == (3, 12, 3, 3)
    assert torch.allclose(out[:, :4], weight + 0.7 * diff[:, :4])
    assert torch.allclose(out[:, 4:], 0.7 * diff[:, 4:])


def test_patched_weight_conv_lora_reshapes():
    weight, up, down = torch.randn(6, 4, 3, 3), torch.randn(6, 2), torch.randn(2, 4, 3, 3)
    out = patched_weight(weight, WeightPatch(CONV_IN, LORA, up=up, down=down), 1.0)
    assert torch.allclose(out, weight + (up @ down.flatten(1)).reshape(6, 4, 3, 3))

