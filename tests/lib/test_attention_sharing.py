"""SD1.5 attention sharing: the official files' layouts load strictly, and the unit's frame/batch
semantics on tiny modules (golden parity through the real ComfyUI: host/test_sd15_golden_parity.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_layerdiffuse import attention_sharing as sharing
from lib_layerdiffuse.errors import InputError, WeightFileError
from lib_layerdiffuse.weight_files import build_model, read_safetensors

from support.sd15_attention import sd15_attention_shapes
from support.synth import manifest, synthetic_file

SD15_LAYER_FILES = {  # manifest -> (frames, control encoder)
    "layer_sd15_transparent_attn": (1, False),
    "layer_sd15_joint": (3, False),
    "layer_sd15_fg2bg": (2, True),
    "layer_sd15_bg2fg": (2, True),
}


def _factory(frames, control):
    return lambda: sharing.build_attention_sharing(sd15_attention_shapes(), frames, control)


@pytest.mark.parametrize("stem", sorted(SD15_LAYER_FILES))
def test_layout_matches_manifest(stem):
    layout = manifest(stem)
    frames, control = SD15_LAYER_FILES[stem]
    assert layout["frames"] == frames and layout["use_control"] == control
    with torch.device("meta"):
        weights = _factory(frames, control)()
    ours = {k: list(v.shape) for k, v in weights.state_dict().items()}
    assert ours == {k: v["shape"] for k, v in layout["tensors"].items()}


@pytest.mark.parametrize("stem", sorted(SD15_LAYER_FILES))
def test_synthetic_file_loads_strictly(stem):
    frames, control = SD15_LAYER_FILES[stem]
    path = synthetic_file(stem)
    state = read_safetensors(str(path))
    weights = build_model(_factory(frames, control), state, path.name)
    key = "hookers.layers.31.to_k_lora.0.down.weight"  # the middle block's cross-attention: [256, 768]
    assert torch.equal(weights.state_dict()[key], state[key].float())
    assert (weights.kwargs_encoder is not None) == control


def test_wrong_file_for_mode_is_a_layout_error():
    path = synthetic_file("layer_sd15_transparent_attn")
    with pytest.raises(WeightFileError) as error:
        build_model(_factory(2, True), read_safetensors(str(path)), path.name)
    message = str(error.value)
    assert path.name in message and "missing" in message and "control_convs" in message


def test_sd15_module_order():
    names = sharing.SD15_ATTENTION_MODULES
    assert len(names) == 32 and len(set(names)) == 32
    assert names[0] == "input_blocks.1.1.transformer_blocks.0.attn1"
    assert names[12] == "output_blocks.3.1.transformer_blocks.0.attn1"
    assert names[30:] == ("middle_block.1.transformer_blocks.0.attn1", "middle_block.1.transformer_blocks.0.attn2")


# ---- tiny attention modules, no host ---------------------------------------------------------

class TinyAttention(nn.Module):
    """The interface of ComfyUI's CrossAttention, in plain torch."""

    def __init__(self, dim, context_dim, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        context = x if context is None else context
        out = sharing.default_attention(self.to_q(x), self.to_k(context), self.to_v(context if value is None else value), self.heads)
        return self.to_out(out)


def _tiny(frames, cross, control=False, seed=0, strength=1.0, overwrites=()):
    torch.manual_seed(seed)
    dim, ctx = 16, 12
    original = TinyAttention(dim, ctx if cross else dim).eval()
    shape = sharing.AttentionShape(dim, ctx if cross else dim, dim, dim, 2)
    weights = sharing.SharingWeights(shape, frames, control, rank=4)
    for p in weights.parameters():
        nn.init.normal_(p, std=0.2)
    state = sharing.SharingState(frames=frames, strength=strength, overwrites=list(overwrites))
    return original, sharing.SharedAttention(original, weights, state, cross_attention=cross).eval()


def test_strength_zero_is_the_original_module():
    original, shared = _tiny(frames=2, cross=False, strength=0.0)
    x = torch.randn(4, 9, 16)
    assert torch.equal(shared(x), original(x))


def test_inactive_step_is_the_original_module():
    original, shared = _tiny(frames=2, cross=True)
    shared._state.active = lambda options: options["sigmas"][0] >= 1.0
    x, ctx = torch.randn(4, 9, 16), torch.randn(4, 5, 12)
    options = {"sigmas": torch.tensor([0.5, 0.5]), "cond_or_uncond": [1, 0]}
    assert torch.equal(shared(x, ctx, transformer_options=options), original(x, ctx))
    options["sigmas"] = torch.tensor([2.0, 2.0])
    assert not torch.allclose(shared(x, ctx, transformer_options=options), original(x, ctx))


def test_keeps_the_projections_other_patches_expect():
    original, shared = _tiny(frames=1, cross=True)
    for name in ("to_q", "to_k", "to_v", "to_out"):
        assert getattr(shared, name) is getattr(original, name)
    assert shared.heads == original.heads
    assert "to_q.weight" in dict(shared.named_parameters())


@pytest.mark.parametrize("rows,chunks", [(3, 1), (6, 2), (5, 1)])
def test_batch_not_a_multiple_of_frames_is_an_error(rows, chunks):
    _, shared = _tiny(frames=2, cross=False)
    options = {"cond_or_uncond": [1, 0][:chunks], "sigmas": torch.ones(rows // chunks)}
    with pytest.raises(sharing.BatchSizeError, match="multiple of 2"):
        shared(torch.randn(rows, 9, 16), transformer_options=options)


def test_frames_share_within_a_group_only():
    _, shared = _tiny(frames=2, cross=False)
    x = torch.randn(4, 9, 16)  # groups (0, 1) and (2, 3)
    base = shared(x)
    y = x.clone()
    y[1] += 1.0  # frame 1 of group 0
    changed = (shared(y) - base).abs().amax(dim=(1, 2))
    assert changed[0] > 1e-3 and changed[1] > 1e-3  # the whole group sees it
    assert changed[2] == 0 and changed[3] == 0  # the other group does not


def test_groups_are_independent_of_batch_position():
    _, shared = _tiny(frames=3, cross=False)
    x = torch.randn(6, 9, 16)
    swapped = torch.cat([x[3:], x[:3]])
    out = shared(x)
    assert torch.allclose(torch.cat([out[3:], out[:3]]), shared(swapped), atol=1e-6)


def test_overwrite_changes_cond_rows_only():
    overwrite = torch.randn(1, 5, 12)
    _, plain = _tiny(frames=2, cross=True)
    _, with_overwrite = _tiny(frames=2, cross=True, overwrites=[overwrite, None])
    x, ctx = torch.randn(4, 9, 16), torch.randn(4, 5, 12)
    options = {"cond_or_uncond": [1, 0], "sigmas": torch.ones(2)}  # rows 0-1 uncond, 2-3 cond
    a = plain(x, ctx, transformer_options=options)
    b = with_overwrite(x, ctx, transformer_options=options)
    assert torch.equal(a[:2], b[:2])
    assert not torch.allclose(a[2:], b[2:])
    # the cond rows now see the overwrite as their frame-0 context
    ctx2 = ctx.clone()
    ctx2[2] = overwrite[0]
    assert torch.allclose(plain(x, ctx2, transformer_options=options), b, atol=1e-6)


def test_overwrite_of_another_length_is_repeated_to_fit():
    overwrite = torch.randn(1, 10, 12)  # a 2x longer prompt: repeating the 5 tokens twice is equivalent
    _, shared = _tiny(frames=1, cross=True, overwrites=[overwrite])
    x, ctx = torch.randn(2, 9, 16), torch.randn(2, 5, 12)
    out = shared(x, ctx, transformer_options={"cond_or_uncond": [0, 1], "sigmas": torch.ones(1)})
    _, same = _tiny(frames=1, cross=True, overwrites=[overwrite[:, :5]])
    out_short = same(x, ctx, transformer_options={"cond_or_uncond": [0, 1], "sigmas": torch.ones(1)})
    assert out.shape == (2, 9, 16) and torch.isfinite(out).all()
    assert not torch.allclose(out, out_short)  # the second half of the prompt matters
    ctx_repeated = torch.cat([ctx, ctx], dim=1)
    _, again = _tiny(frames=1, cross=True, overwrites=[overwrite])
    assert torch.allclose(again(x, ctx_repeated, transformer_options={"cond_or_uncond": [0, 1], "sigmas": torch.ones(1)}),
                          out, atol=1e-5)


def test_control_features_need_a_matching_image_size():
    _, shared = _tiny(frames=2, cross=False, control=True)
    shared._state.control = {4: torch.randn(1, 256, 2, 2)}
    with pytest.raises(InputError, match="control image does not match"):
        shared(torch.randn(2, 9, 16))
    shared._state.control = {9: torch.randn(1, 256, 3, 3)}
    assert shared(torch.randn(2, 9, 16)).shape == (2, 9, 16)



def test_half_precision_compute_follows_float32():
    """fp16 UNets get fp16 sharing weights (shared_attention_modules(dtype=...)); the result stays
    close to the float32 computation."""
    torch.manual_seed(0)
    original = TinyAttention(16, 16).eval()
    shape = sharing.AttentionShape(16, 16, 16, 16, 2)
    weights = sharing.AttentionSharingWeights([shape], frames=2, use_control=False)
    for p in weights.parameters():
        nn.init.normal_(p, std=0.2)
    state = sharing.SharingState(frames=2)
    (full,) = sharing.shared_attention_modules([original], weights, state)
    x = torch.randn(4, 9, 16)
    expected = full(x)
    half_original = TinyAttention(16, 16).eval()
    half_original.load_state_dict(original.state_dict())
    half_original.half()
    (half,) = sharing.shared_attention_modules([half_original], weights, state, dtype=torch.float16)
    assert next(half.sharing.parameters()).dtype == torch.float16
    out = half(x.half())
    assert out.dtype == torch.float16
    assert (out.float() - expected).abs().max() < 2e-2 * expected.abs().max()
