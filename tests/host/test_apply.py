"""The generation-mode nodes in the real ComfyUI (CPU): strength and stop-at, batch and family
errors, no leakage into the unpatched model, coexistence with core attention patches, the SDXL
patch builder on the real SDXL UNet (meta device), and drop-in compatibility with the peer's
saved workflows."""
from __future__ import annotations

import pytest
import torch

from support.pack import pack_module
from support.sd_models import SD15_GOLDENS, golden_patch, percent_between, sample_evals, sample_once, sdxl_model
from support.synth import golden, manifest, meta_state, synthetic_file, synthweights
from support.workflows import compat_names, load_compat

ATOL = 1e-4
TRANSPARENT, JOINT = "sd15_transparent_attn_seed0", "sd15_joint_seed0"
FG2BG, BG2FG = "sd15_fg2bg_seed0", "sd15_bg2fg_seed0"
SDXL_PATCH_MANIFESTS = ["layer_xl_transparent_attn", "layer_xl_transparent_conv", "layer_xl_fg2ble",
                        "layer_xl_bg2ble", "layer_xl_fgble2bg", "layer_xl_bgble2fg"]
APPLY_NODE_IDS = ["LayeredDiffusionApply", "LayeredDiffusionJointApply", "LayeredDiffusionCondApply",
                  "LayeredDiffusionCondJointApply", "LayeredDiffusionDiffApply"]


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


def _mode(apply_module, stem):
    modes_name, config, _, _ = SD15_GOLDENS[stem]
    return apply_module._mode(getattr(apply_module, modes_name), config)


# ---- strength, stop at -----------------------------------------------------------------------

def test_strength_zero_is_the_unpatched_model(apply_module, sd15_model, goldens, unpatched):
    g = goldens[TRANSPARENT]
    patched = golden_patch(apply_module, TRANSPARENT, sd15_model, g, strength=0.0)
    assert torch.equal(sample_once(patched, g), unpatched[TRANSPARENT])


def test_half_strength_lies_between(apply_module, sd15_model, goldens, unpatched):
    g = goldens[TRANSPARENT]
    half = sample_once(golden_patch(apply_module, TRANSPARENT, sd15_model, g, strength=0.5), g)
    to_full = (half - g["patched.final"]).abs().mean()
    to_none = (half - unpatched[TRANSPARENT]).abs().mean()
    assert to_full > 1.0 and to_none > 1.0


@pytest.mark.parametrize("stem", [JOINT, FG2BG])
def test_stop_at_zero_is_the_unpatched_model(apply_module, sd15_model, goldens, unpatched, stem):
    g = goldens[stem]
    patched = golden_patch(apply_module, stem, sd15_model, g, stop_at=0.0)
    assert torch.equal(sample_once(patched, g), unpatched[stem])


def test_stop_at_switches_at_its_sigma(apply_module, sd15_model, goldens, unpatched):
    g = goldens[TRANSPARENT]
    sigma = float(g["input.sigma"][0])
    sampling = sd15_model.get_model_object("model_sampling")
    percents = [p / 100 for p in range(1, 100)]
    before = max(p for p in percents if sampling.percent_to_sigma(p) > sigma)  # stops before this step
    after = min(p for p in percents if sampling.percent_to_sigma(p) < sigma)  # stops after it
    stopped = golden_patch(apply_module, TRANSPARENT, sd15_model, g, stop_at=before)
    assert torch.equal(sample_once(stopped, g), unpatched[TRANSPARENT])
    running = golden_patch(apply_module, TRANSPARENT, sd15_model, g, stop_at=after)
    assert (sample_once(running, g) - g["patched.final"]).abs().max() < _final_tolerance(g)


def test_sampling_across_stop_at_switches_mid_run(apply_module, sd15_model, goldens):
    g = goldens[FG2BG]
    high, low = float(g["input.sigma"][0]), 0.5
    stop = percent_between(sd15_model, high, low)
    full = golden_patch(apply_module, FG2BG, sd15_model, g)
    stopping = golden_patch(apply_module, FG2BG, sd15_model, g, stop_at=stop)
    first, second = sample_evals(stopping, g, [high, low])
    full_first, full_second = sample_evals(full, g, [high, low])
    base_first, base_second = sample_evals(sd15_model, g, [high, low])
    assert torch.equal(first, full_first)  # before stop_at: the patched model
    assert torch.equal(second, base_second)  # after: the unpatched one, bit for bit
    assert (full_second - base_second).abs().max() > 0.1 and (first - base_first).abs().max() > 0.1


def _synthetic_concat_file(path, extra_channels=4):
    """A small layer-conditioning patch file for the SD1.5 UNet: a widened input conv (diff), its
    bias, a ResBlock conv (diff) and an attention LoRA, exercising every kind of patch."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    q = "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
    state = {
        "diffusion_model.input_blocks.0.0.weight::diff::0": torch.randn(320, 4 + extra_channels, 3, 3, generator=gen) * 0.05,
        "diffusion_model.input_blocks.0.0.bias::diff::0": torch.randn(320, generator=gen) * 0.01,
        "diffusion_model.input_blocks.1.0.in_layers.2.weight::diff::0": torch.randn(320, 320, 3, 3, generator=gen) * 0.005,
        f"{q}::lora::0": torch.randn(1280, 8, generator=gen) * 0.05,
        f"{q}::lora::1": torch.randn(8, 1280, generator=gen) * 0.05,
    }
    save_file({k: v.half() for k, v in state.items()}, str(path))
    return path


def test_concat_mode_stop_at_drops_weights_and_concat(apply_module, sd15_model, goldens, tmp_path):
    """The SDXL layer-conditioning machinery (weight patches + concat conditioning + stop_at),
    run on the SD1.5 UNet with a synthetic patch file, since an SDXL UNet does not fit in memory."""
    g = goldens[TRANSPARENT]
    path = _synthetic_concat_file(tmp_path / "concat_test.safetensors")
    mode = apply_module.Mode("SD15 concat test", path.name, "SD15")
    cond, uncond = [[g["input.cond_context"], {}]], [[g["input.uncond_context"], {}]]
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))}
    high, low = float(g["input.sigma"][0]), 0.5
    stop = percent_between(sd15_model, high, low)

    full = apply_module.apply_concat_mode(sd15_model, mode, cond, uncond, [latent], 1.0, weight_path=str(path))
    stopping = apply_module.apply_concat_mode(sd15_model, mode, cond, uncond, [latent], 1.0, stop_at=stop,
                                              weight_path=str(path))
    full_first, full_second = sample_evals(full[0], g, [high, low], full[1], full[2])
    first, second = sample_evals(stopping[0], g, [high, low], stopping[1], stopping[2])
    base_first, base_second = sample_evals(sd15_model, g, [high, low])
    assert (first - full_first).abs().max() < 1e-4  # before stop_at: hooked weights = patched weights
    assert torch.equal(second, base_second)  # after it: the original weights, no concat
    assert (full_second - base_second).abs().max() > 0.1 and (first - base_first).abs().max() > 0.1
    # stop_at 0 leaves nothing of the mode
    (model0, cond0, uncond0) = apply_module.apply_concat_mode(sd15_model, mode, cond, uncond, [latent], 1.0,
                                                              stop_at=0.0, weight_path=str(path))
    assert torch.equal(sample_once(model0, g, cond=cond0, uncond=uncond0), sample_once(sd15_model, g))
    # and the checkpoint's model is untouched afterwards
    assert torch.equal(sample_evals(sd15_model, g, [high, low])[1], base_second)


def _synthetic_lora_patches(patch_files, tmp_path):
    """Same-shape patches for the SD1.5 UNet (an attention LoRA and a conv diff), like the SDXL
    foreground files hold."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(4)
    q = "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
    state = {
        f"{q}::lora::0": torch.randn(1280, 8, generator=gen) * 0.05,
        f"{q}::lora::1": torch.randn(8, 1280, generator=gen) * 0.05,
        "diffusion_model.input_blocks.1.0.in_layers.2.weight::diff::0": torch.randn(320, 320, 3, 3, generator=gen) * 0.005,
    }
    path = tmp_path / "fg_test.safetensors"
    save_file(state, str(path))
    return patch_files.parse_patch_file(dict(state), path.name)


def _lora_hook_conditioning(cond, strength=1.0):
    """`cond` with a user's ComfyUI LoRA hook (as the core 'Create Hook LoRA' nodes make one)."""
    import comfy.hooks
    from comfy.weight_adapter import LoRAAdapter

    gen = torch.Generator().manual_seed(6)
    k = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    lora = {"layer.lora_up.weight": torch.randn(1280, 4, generator=gen) * 0.2,
            "layer.lora_down.weight": torch.randn(4, 768, generator=gen) * 0.2}
    hook = comfy.hooks.WeightHook(strength_model=strength, strength_clip=0.0)
    hook.weights = {k: LoRAAdapter(set(), (lora["layer.lora_up.weight"], lora["layer.lora_down.weight"], None, None, None, None))}
    hook.need_weight_init = False
    group = comfy.hooks.HookGroup()
    group.add(hook)
    return comfy.hooks.set_hooks_for_conditioning(cond, group)


def test_weight_patches_stop_at_without_conditioning(apply_module, sd15_model, goldens, tmp_path):
    """The SDXL foreground nodes' stop_at (weight patches, no conditioning passes through the
    node): run on the SD1.5 UNet with same-shape synthetic patches."""
    g = goldens[TRANSPARENT]
    patches = _synthetic_lora_patches(apply_module.patch_files, tmp_path)
    high, low = float(g["input.sigma"][0]), 0.5
    stop = percent_between(sd15_model, high, low)
    full = apply_module.apply_weight_patches(sd15_model, patches, 1.0)
    stopping = apply_module.apply_stoppable_weight_patches(sd15_model, patches, 1.0, stop)
    full_first, _ = sample_evals(full, g, [high, low])
    base_first, base_second = sample_evals(sd15_model, g, [high, low])
    for _ in range(2):  # the same model samples twice: registration must not pile up
        first, second = sample_evals(stopping, g, [high, low])
        assert (first - full_first).abs().max() < 1e-4  # before stop_at: the patched weights
        assert torch.equal(second, base_second)  # after it: the checkpoint's own weights
    assert (first - base_first).abs().max() > 0.1
    zero = apply_module.apply_stoppable_weight_patches(sd15_model, patches, 1.0, 0.0)
    assert torch.equal(sample_once(zero, g), sample_once(sd15_model, g))
    assert torch.equal(sample_evals(sd15_model, g, [high, low])[1], base_second)  # nothing leaked


def test_weight_patches_stop_at_keeps_the_prompts_own_hooks(apply_module, sd15_model, goldens, tmp_path):
    """A ComfyUI LoRA hook on the prompt still acts alongside the stopping patches, before and
    after stop_at."""
    g = goldens[TRANSPARENT]
    patches = _synthetic_lora_patches(apply_module.patch_files, tmp_path)
    high, low = float(g["input.sigma"][0]), 0.5
    stop = percent_between(sd15_model, high, low)
    cond = _lora_hook_conditioning([[g["input.cond_context"], {}]])
    uncond = [[g["input.uncond_context"], {}]]
    hooked_first, hooked_second = sample_evals(sd15_model, g, [high, low], cond, uncond)
    plain_second = sample_evals(sd15_model, g, [high, low])[1]
    assert (hooked_second - plain_second).abs().max() > 1e-3  # the prompt's hook acts
    full = apply_module.apply_weight_patches(sd15_model, patches, 1.0)
    full_first, _ = sample_evals(full, g, [high, low], cond, uncond)
    stopping = apply_module.apply_stoppable_weight_patches(sd15_model, patches, 1.0, stop)
    first, second = sample_evals(stopping, g, [high, low], cond, uncond)
    assert (first - full_first).abs().max() < 1e-4 and (first - hooked_first).abs().max() > 0.1
    assert (second - hooked_second).abs().max() < 1e-5


# ---- errors -----------------------------------------------------------------------------------

def test_batch_not_multiple_of_frames_is_a_clear_error(apply_module, sd15_model, goldens):
    g = goldens[JOINT]
    patched = golden_patch(apply_module, JOINT, sd15_model, g)
    sharing = pack_module("lib_layerdiffuse.attention_sharing")
    with pytest.raises(sharing.BatchSizeError, match=r"multiple of 3; got a batch of 2"):
        sample_once(patched, g, noise=g["input.noise"][:2])


def test_single_frame_mode_takes_any_batch(apply_module, sd15_model, goldens):
    g = goldens[TRANSPARENT]
    patched = golden_patch(apply_module, TRANSPARENT, sd15_model, g)
    noise = torch.cat([g["input.noise"], g["input.noise"]])
    out = sample_once(patched, g, noise=noise)
    assert (out[1] - g["patched.final"][0]).abs().max() < _final_tolerance(g)


def test_sdxl_config_on_sd15_model_names_both(apply_module, sd15_model):
    with pytest.raises(apply_module.ModelError) as error:
        apply_module.LayeredDiffusionApply.execute(sd15_model, "SDXL, Conv Injection", 1.0)
    message = str(error.value)
    assert "SDXL, Conv Injection" in message and "SDXL models" in message and "SD15 (SD15)" in message


def test_control_mode_without_image_is_an_error(apply_module, sd15_model, goldens):
    with pytest.raises(apply_module.ModelError, match="needs the image"):
        golden_patch(apply_module, FG2BG, sd15_model, goldens[FG2BG], control_image=None)


# ---- no leakage, two modes, coexistence ---------------------------------------------------------

def _attention_classes(model):
    unet = model.model.diffusion_model
    return {type(m).__name__ for name, m in unet.named_modules() if name.endswith(("attn1", "attn2"))}


def test_no_leak_and_two_modes_in_one_graph(apply_module, sd15_model, goldens, unpatched):
    g_t, g_j = goldens[TRANSPARENT], goldens[JOINT]
    fg = golden_patch(apply_module, TRANSPARENT, sd15_model, g_t)
    joint = golden_patch(apply_module, JOINT, sd15_model, g_j)
    first = sample_once(fg, g_t)
    assert (sample_once(joint, g_j) - g_j["patched.final"]).abs().max() < _final_tolerance(g_j)
    assert torch.equal(sample_once(fg, g_t), first)
    assert (first - g_t["patched.final"]).abs().max() < _final_tolerance(g_t)
    # the checkpoint's own model is untouched: bit-identical to before any patch
    for stem in (TRANSPARENT, JOINT):
        assert torch.equal(sample_once(sd15_model, goldens[stem]), unpatched[stem])
    assert _attention_classes(sd15_model) == {"CrossAttention"}
    assert not sd15_model.object_patches


def test_model_size_counts_the_sharing_weights(apply_module, sd15_model, goldens):
    import comfy.model_management

    base = sd15_model.model_size()
    fg = golden_patch(apply_module, TRANSPARENT, sd15_model, goldens[TRANSPARENT])
    modules = {id(m.sharing): m.sharing for m in fg.object_patches.values()}
    layer_bytes = sum(comfy.model_management.module_size(m) for m in modules.values())
    assert layer_bytes > 0.1 * base and fg.model_size() >= base + layer_bytes
    again = golden_patch(apply_module, JOINT, fg, goldens[JOINT])
    joint = golden_patch(apply_module, JOINT, sd15_model, goldens[JOINT])
    assert again.model_size() == joint.model_size() > fg.model_size()  # replaced, not added
    assert sd15_model.model_size() == base


def test_reapplying_replaces_the_previous_mode(apply_module, sd15_model, goldens):
    g_t, g_j = goldens[TRANSPARENT], goldens[JOINT]
    joint = golden_patch(apply_module, JOINT, sd15_model, g_j)
    fg_on_joint = golden_patch(apply_module, TRANSPARENT, joint, g_t)
    assert (sample_once(fg_on_joint, g_t) - g_t["patched.final"]).abs().max() < _final_tolerance(g_t)


@pytest.mark.parametrize("order", ["core patch first", "core patch after"])
def test_core_attention_patch_still_applies(apply_module, sd15_model, goldens, order):
    g = goldens[TRANSPARENT]
    calls = []

    def halve(n, extra_options):
        calls.append(extra_options["block"])
        return n * 0.5

    if order == "core patch first":
        base = sd15_model.clone()
        base.set_model_attn2_output_patch(halve)
        both = golden_patch(apply_module, TRANSPARENT, base, g)
    else:
        both = golden_patch(apply_module, TRANSPARENT, sd15_model, g).clone()
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


# ---- SDXL: the patch builder on the real SDXL UNet (meta device) ------------------------------------

@pytest.fixture(scope="module")
def sdxl_meta(comfyui_path):
    """ComfyUI's SDXL model built from the SDXL checkpoint layout without allocating it."""
    return sdxl_model(torch.float32, meta=True)


@pytest.mark.parametrize("stem", SDXL_PATCH_MANIFESTS)
def test_sdxl_files_map_onto_the_sdxl_unet(apply_module, sdxl_meta, stem):
    patch_files = pack_module("lib_layerdiffuse.patch_files")
    patches = patch_files.parse_patch_file(meta_state(stem), stem)
    shapes = {k: tuple(v.shape) for k, v in sdxl_meta.model_state_dict().items()}
    patch_files.check_against_model(patches, shapes, stem)
    work = apply_module.apply_weight_patches(sdxl_meta, patches, 0.8)
    assert set(work.patches) == {p.key for p in patches}
    assert not sdxl_meta.patches  # the input model keeps none


def test_sd15_config_on_sdxl_model_names_both(apply_module, sdxl_meta):
    with pytest.raises(apply_module.ModelError) as error:
        apply_module.LayeredDiffusionJointApply.execute(sdxl_meta, "SD15, attn_sharing, Batch size (3N)")
    assert "SD15 models" in str(error.value) and "SDXL (SDXL)" in str(error.value)


# one key per family: attention LoRA q/k/v/out, the widened input conv, ResBlock conv, norm, bias, output conv
FAMILY_KEYS = {
    "layer_xl_transparent_attn": [f"diffusion_model.output_blocks.2.1.transformer_blocks.3.attn{a}.{p}.weight"
                                  for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")],
    "layer_xl_fgble2bg": ["diffusion_model.input_blocks.0.0.weight", "diffusion_model.input_blocks.0.0.bias",
                          "diffusion_model.input_blocks.4.0.in_layers.2.weight",
                          "diffusion_model.middle_block.0.out_layers.0.weight", "diffusion_model.out.2.weight"],
    "layer_xl_bg2ble": ["diffusion_model.input_blocks.0.0.weight", "diffusion_model.output_blocks.2.2.conv.weight"],
}


@pytest.mark.parametrize("stem", sorted(FAMILY_KEYS))
@pytest.mark.parametrize("strength", [1.0, 0.35])
def test_sdxl_patched_weights_are_base_plus_delta(apply_module, sdxl_meta, stem, strength):
    """ComfyUI's own weight patching on the real key names gives the lib's definition of each patch."""
    import comfy.utils
    patch_files = pack_module("lib_layerdiffuse.patch_files")
    layout = manifest(stem)["tensors"]
    wanted = {k: v for k, v in layout.items() if k.split("::")[0] in FAMILY_KEYS[stem]}
    state = {k: torch.from_numpy(synthweights().tensor_values(k, v["shape"])).half() for k, v in wanted.items()}
    patches = patch_files.parse_patch_file(state, stem)
    assert {p.key for p in patches} == set(FAMILY_KEYS[stem])

    work = apply_module.apply_weight_patches(sdxl_meta, patches, strength)
    meta_shapes = {p.key: comfy.utils.get_attr(work.model, p.key).shape for p in patches}
    torch.manual_seed(0)
    try:
        for p in patches:
            base = torch.randn(meta_shapes[p.key])
            comfy.utils.set_attr_param(work.model, p.key, base)
            work.patch_weight_to_device(p.key, device_to=torch.device("cpu"))
            got = comfy.utils.get_attr(work.model, p.key)
            expected = patch_files.patched_weight(base, p, strength)
            assert got.shape == expected.shape, p.key
            assert torch.allclose(got, expected, atol=1e-5), p.key
            assert not torch.allclose(pad_like(base, got), got)  # the patch really changed it
            if p.key.endswith("input_blocks.0.0.weight"):
                assert got.shape[1] in (8, 12)
    finally:
        for p in patches:  # back to meta, so the shared fixture stays allocation-free
            comfy.utils.set_attr_param(work.model, p.key, torch.empty(meta_shapes[p.key], device="meta"))
        work.backup.clear()


def pad_like(weight, like):
    out = torch.zeros_like(like)
    out[tuple(slice(0, s) for s in weight.shape)] = weight
    return out


def test_sdxl_cond_node_feeds_the_latent_to_cond_and_uncond(apply_module, sdxl_meta, tmp_path, comfyui_path):
    import folder_paths
    from safetensors.torch import save_file

    layout = manifest("layer_xl_fg2ble")["tensors"]
    keep = [k for k in layout if k.startswith("diffusion_model.input_blocks.0.0.") or ".out_layers.3." in k]
    folder = tmp_path / "layer_model"
    folder.mkdir()
    save_file({k: torch.from_numpy(synthweights().tensor_values(k, layout[k]["shape"])).half() for k in keep},
              str(folder / "layer_xl_fg2ble.safetensors"))
    folder_paths.add_model_folder_path("layer_model", str(folder), is_default=True)

    latent = {"samples": torch.randn(1, 4, 8, 8)}
    cond = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]]
    uncond = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    model, cond_out, uncond_out = apply_module.LayeredDiffusionCondApply.execute(
        sdxl_meta, cond, uncond, latent, "SDXL, Foreground", 0.9).result
    assert set(model.patches) == {k.split("::")[0] for k in keep}
    assert all(p[0] == 0.9 for patches in model.patches.values() for p in patches)
    expected = sdxl_meta.model.latent_format.process_in(latent["samples"])
    for out, original in ((cond_out, cond), (uncond_out, uncond)):
        assert torch.equal(out[0][1]["model_conds"]["c_concat"].cond, expected)
        assert out[0][0] is original[0][0] and "model_conds" not in original[0][1]
    # two latents where the file's input conv takes one more: an error, not a shape crash mid-sampling
    diff_mode = apply_module._mode(apply_module.DIFF_MODES, "SDXL, Foreground")
    with pytest.raises(apply_module.ModelError, match="expects 4 concat channels, got 8"):
        apply_module.apply_concat_mode(sdxl_meta, diff_mode, cond, uncond, [latent, latent], 1.0,
                                       weight_path=str(folder / "layer_xl_fg2ble.safetensors"))
