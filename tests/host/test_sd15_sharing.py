"""SD1.5 attention sharing in the real ComfyUI (CPU), through nodes/sd15_sharing.py and the nodes:
strength and stop_at, batch errors, no leakage into the unpatched model, model size, coexistence
with core attention patches, the nodes against the goldens."""
from __future__ import annotations

import pytest
import torch

from support.pack import pack_module
from support.sd_models import SD15_GOLDENS, golden_patch, percent_between, sample_evals, sample_once
from support.synth import golden, synthetic_file

ATOL = 1e-4
TRANSPARENT, JOINT = "sd15_transparent_attn_seed0", "sd15_joint_seed0"
FG2BG, BG2FG = "sd15_fg2bg_seed0", "sd15_bg2fg_seed0"


def _final_tolerance(g):
    return ATOL * float(g["input.cfg"][0]) / 0.18215


@pytest.fixture(scope="module")
def goldens():
    return {stem: golden(stem)[1] for stem in SD15_GOLDENS}


@pytest.fixture(scope="module")
def unpatched(sd15_model, goldens):
    """The unpatched model's `final` for each golden's inputs, computed before any patch ran."""
    return {stem: sample_once(sd15_model, g) for stem, g in goldens.items()}


@pytest.fixture(scope="module")
def layer_model_folder(comfyui_path, tmp_path_factory):
    """A `layer_model` folder holding the synthetic SD1.5 layer files the goldens were made with."""
    import folder_paths

    folder = tmp_path_factory.mktemp("layer_model")
    for _, _, stem, seed in SD15_GOLDENS.values():
        source = synthetic_file(stem, seed=seed)
        (folder / source.name).symlink_to(source)
    folder_paths.add_model_folder_path("layer_model", str(folder), is_default=True)
    return folder


# ---- strength, stop at -----------------------------------------------------------------------

def test_strength_zero_is_the_unpatched_model(sd15_model, goldens, unpatched):
    g = goldens[TRANSPARENT]
    patched = golden_patch(TRANSPARENT, sd15_model, g, strength=0.0)
    assert torch.equal(sample_once(patched, g), unpatched[TRANSPARENT])


def test_half_strength_lies_between(sd15_model, goldens, unpatched):
    g = goldens[TRANSPARENT]
    half = sample_once(golden_patch(TRANSPARENT, sd15_model, g, strength=0.5), g)
    to_full = (half - g["patched.final"]).abs().mean()
    to_none = (half - unpatched[TRANSPARENT]).abs().mean()
    assert to_full > 1.0 and to_none > 1.0


@pytest.mark.parametrize("stem", [JOINT, FG2BG])
def test_stop_at_zero_is_the_unpatched_model(sd15_model, goldens, unpatched, stem):
    g = goldens[stem]
    patched = golden_patch(stem, sd15_model, g, stop_at=0.0)
    assert torch.equal(sample_once(patched, g), unpatched[stem])


def test_stop_at_switches_at_its_sigma(sd15_model, goldens, unpatched):
    g = goldens[TRANSPARENT]
    sigma = float(g["input.sigma"][0])
    sampling = sd15_model.get_model_object("model_sampling")
    percents = [p / 100 for p in range(1, 100)]
    before = max(p for p in percents if sampling.percent_to_sigma(p) > sigma)  # stops before this step
    after = min(p for p in percents if sampling.percent_to_sigma(p) < sigma)  # stops after it
    stopped = golden_patch(TRANSPARENT, sd15_model, g, stop_at=before)
    assert torch.equal(sample_once(stopped, g), unpatched[TRANSPARENT])
    running = golden_patch(TRANSPARENT, sd15_model, g, stop_at=after)
    assert (sample_once(running, g) - g["patched.final"]).abs().max() < _final_tolerance(g)


def test_sampling_across_stop_at_switches_mid_run(sd15_model, goldens):
    g = goldens[FG2BG]
    high, low = float(g["input.sigma"][0]), 0.5
    stop = percent_between(sd15_model, high, low)
    full = golden_patch(FG2BG, sd15_model, g)
    stopping = golden_patch(FG2BG, sd15_model, g, stop_at=stop)
    first, second = sample_evals(stopping, g, [high, low])
    full_first, full_second = sample_evals(full, g, [high, low])
    base_first, base_second = sample_evals(sd15_model, g, [high, low])
    assert torch.equal(first, full_first)  # before stop_at: the patched model
    assert torch.equal(second, base_second)  # after: the unpatched one, bit for bit
    assert (full_second - base_second).abs().max() > 0.1 and (first - base_first).abs().max() > 0.1


# ---- errors -----------------------------------------------------------------------------------

def test_batch_not_multiple_of_frames_is_a_clear_error(sd15_model, goldens):
    g = goldens[JOINT]
    patched = golden_patch(JOINT, sd15_model, g)
    sharing = pack_module("lib_layerdiffuse.attention_sharing")
    with pytest.raises(sharing.BatchSizeError, match=r"multiple of 3; got a batch of 2"):
        sample_once(patched, g, noise=g["input.noise"][:2])


def test_single_frame_mode_takes_any_batch(sd15_model, goldens):
    g = goldens[TRANSPARENT]
    patched = golden_patch(TRANSPARENT, sd15_model, g)
    noise = torch.cat([g["input.noise"], g["input.noise"]])
    out = sample_once(patched, g, noise=noise)
    assert (out[1] - g["patched.final"][0]).abs().max() < _final_tolerance(g)


def test_sdxl_config_on_sd15_model_names_both(apply_module, sd15_model):
    with pytest.raises(pack_module("lib_layerdiffuse.errors").ModelError) as error:
        apply_module.LayeredDiffusionApply.execute(sd15_model, "SDXL, Conv Injection", 1.0)
    message = str(error.value)
    assert "SDXL, Conv Injection" in message and "SDXL models" in message and "SD15 (SD15)" in message


def test_control_mode_without_image_is_an_error(sd15_model, goldens):
    with pytest.raises(pack_module("lib_layerdiffuse.errors").ModelError, match="needs the image"):
        golden_patch(FG2BG, sd15_model, goldens[FG2BG], control_image=None)


# ---- no leakage, two modes, coexistence ---------------------------------------------------------

def _attention_classes(model):
    unet = model.model.diffusion_model
    return {type(m).__name__ for name, m in unet.named_modules() if name.endswith(("attn1", "attn2"))}


def test_no_leak_and_two_modes_in_one_graph(sd15_model, goldens, unpatched):
    g_t, g_j = goldens[TRANSPARENT], goldens[JOINT]
    fg = golden_patch(TRANSPARENT, sd15_model, g_t)
    joint = golden_patch(JOINT, sd15_model, g_j)
    first = sample_once(fg, g_t)
    assert (sample_once(joint, g_j) - g_j["patched.final"]).abs().max() < _final_tolerance(g_j)
    assert torch.equal(sample_once(fg, g_t), first)
    assert (first - g_t["patched.final"]).abs().max() < _final_tolerance(g_t)
    # the checkpoint's own model is untouched: bit-identical to before any patch
    for stem in (TRANSPARENT, JOINT):
        assert torch.equal(sample_once(sd15_model, goldens[stem]), unpatched[stem])
    assert _attention_classes(sd15_model) == {"CrossAttention"}
    assert not sd15_model.object_patches


def test_model_size_counts_the_sharing_weights(sd15_model, goldens):
    import comfy.model_management

    base = sd15_model.model_size()
    fg = golden_patch(TRANSPARENT, sd15_model, goldens[TRANSPARENT])
    modules = {id(m.sharing): m.sharing for m in fg.object_patches.values()}
    layer_bytes = sum(comfy.model_management.module_size(m) for m in modules.values())
    assert layer_bytes > 0.1 * base and fg.model_size() >= base + layer_bytes
    again = golden_patch(JOINT, fg, goldens[JOINT])
    joint = golden_patch(JOINT, sd15_model, goldens[JOINT])
    assert again.model_size() == joint.model_size() > fg.model_size()  # replaced, not added
    assert sd15_model.model_size() == base


def test_reapplying_replaces_the_previous_mode(sd15_model, goldens):
    g_t, g_j = goldens[TRANSPARENT], goldens[JOINT]
    joint = golden_patch(JOINT, sd15_model, g_j)
    fg_on_joint = golden_patch(TRANSPARENT, joint, g_t)
    assert (sample_once(fg_on_joint, g_t) - g_t["patched.final"]).abs().max() < _final_tolerance(g_t)


@pytest.mark.parametrize("order", ["core patch first", "core patch after"])
def test_core_attention_patch_still_applies(sd15_model, goldens, order):
    g = goldens[TRANSPARENT]
    calls = []

    def halve(n, extra_options):
        calls.append(extra_options["block"])
        return n * 0.5

    if order == "core patch first":
        base = sd15_model.clone()
        base.set_model_attn2_output_patch(halve)
        both = golden_patch(TRANSPARENT, base, g)
    else:
        both = golden_patch(TRANSPARENT, sd15_model, g).clone()
        both.set_model_attn2_output_patch(halve)
    out = sample_once(both, g)
    assert len(calls) == 16  # every cross-attention of the one UNet call
    assert (out - g["patched.final"]).abs().max() > 1.0  # the core patch acts
    core_only = sd15_model.clone()
    core_only.set_model_attn2_output_patch(halve)
    assert (out - sample_once(core_only, g)).abs().max() > 1.0  # and so does LayerDiffuse


# ---- the nodes as ComfyUI calls them -----------------------------------------------------------

@pytest.mark.parametrize("stem", [TRANSPARENT, JOINT, BG2FG])
def test_nodes_match_goldens(apply_module, sd15_model, goldens, layer_model_folder, stem):
    g = goldens[stem]
    _, config, _, _ = SD15_GOLDENS[stem]
    cond = lambda i: [[g[f"input.overwrite_context_{i}"], {}]]  # noqa: E731
    if stem == TRANSPARENT:
        out = apply_module.LayeredDiffusionApply.execute(sd15_model, config, 1.0)
    elif stem == JOINT:
        out = apply_module.LayeredDiffusionJointApply.execute(sd15_model, config, cond(0), cond(1), cond(2))
    else:
        out = apply_module.LayeredDiffusionCondJointApply.execute(sd15_model, g["input.control_image"], config,
                                                                  cond(0), cond(1))
    (model,) = out.result
    assert model is not sd15_model
    assert (sample_once(model, g) - g["patched.final"]).abs().max() < _final_tolerance(g)
