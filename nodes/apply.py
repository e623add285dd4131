"""Apply a LayerDiffuse generation mode to a model: the five "Layer Diffuse ... Apply" nodes.

SD1.5 modes swap the UNet's 32 attention modules for attention-sharing ones (per-clone object
patches); SDXL modes add weight patches and, for the layer-conditioning modes, concat
conditioning. Every change is made on `model.clone()` through the ModelPatcher.

Node ids, input names/order, combo strings and outputs are those of huchenlei/ComfyUI-layerdiffuse
(workflows saved with it open unchanged); new inputs come after the old ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

import comfy.conds
import comfy.hooks
import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management as model_management
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.supported_models
from comfy.weight_adapter import LoRAAdapter
from comfy_api.latest import io

from ..lib_layerdiffuse import attention_sharing as sharing
from ..lib_layerdiffuse import patch_files
from ..lib_layerdiffuse.errors import ModelError
from ..lib_layerdiffuse.weight_files import SD15, SDXL, WEIGHT_FILES, build_model, read_safetensors
from . import model_store

CATEGORY = "layer_diffuse"
UNET_PREFIX = "diffusion_model."
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
WRAPPER_KEY = "layerdiffuse_stop_at"
SHARING_BYTES = "layerdiffuse_sharing_bytes"


@dataclass(frozen=True)
class Mode:
    """One LayerDiffuse generation mode: the peer's config string and what it loads."""
    config: str
    file: str
    family: str
    frames: int = 1
    control: bool = False

    @property
    def attention_sharing(self) -> bool:
        return self.family == SD15


APPLY_MODES = (
    Mode("SDXL, Attention Injection", "layer_xl_transparent_attn.safetensors", SDXL),
    Mode("SDXL, Conv Injection", "layer_xl_transparent_conv.safetensors", SDXL),
    Mode("SD15, Attention Injection, attn_sharing", "layer_sd15_transparent_attn.safetensors", SD15),
)
JOINT_MODES = (Mode("SD15, attn_sharing, Batch size (3N)", "layer_sd15_joint.safetensors", SD15, frames=3),)
COND_MODES = (
    Mode("SDXL, Foreground", "layer_xl_fg2ble.safetensors", SDXL),
    Mode("SDXL, Background", "layer_xl_bg2ble.safetensors", SDXL),
)
COND_JOINT_MODES = (
    Mode("SD15, Foreground, attn_sharing, Batch size (2N)", "layer_sd15_fg2bg.safetensors", SD15, frames=2, control=True),
    Mode("SD15, Background, attn_sharing, Batch size (2N)", "layer_sd15_bg2fg.safetensors", SD15, frames=2, control=True),
)
DIFF_MODES = (
    Mode("SDXL, Foreground", "layer_xl_fgble2bg.safetensors", SDXL),
    Mode("SDXL, Background", "layer_xl_bgble2fg.safetensors", SDXL),
)


def _mode(modes: Sequence[Mode], config: str) -> Mode:
    for mode in modes:
        if mode.config == config:
            return mode
    raise ModelError(f"unknown config {config!r}; choose one of: {', '.join(m.config for m in modes)}")


def model_family(model) -> str:
    """SD15 or SDXL for a MODEL, from ComfyUI's own detection of the checkpoint."""
    config = model.model.model_config
    if isinstance(config, comfy.supported_models.SDXL):
        return SDXL
    if isinstance(config, comfy.supported_models.SD15):
        return SD15
    raise ModelError(
        f"LayerDiffuse works with SD1.5 and SDXL models; the connected model is {type(config).__name__}.")


def check_family(model, mode: Mode) -> None:
    family = model_family(model)
    if family != mode.family:
        raise ModelError(
            f"The config '{mode.config}' is for {mode.family} models, but the connected model is {family} "
            f"({type(model.model.model_config).__name__}). Choose a {family} config, or load a {mode.family} checkpoint.")


def _stop_sigma(model, stop_at: float) -> Optional[float]:
    """The sigma below which a patch no longer applies (None: it applies to the end)."""
    if stop_at >= 1.0:
        return None
    return float(model.get_model_object("model_sampling").percent_to_sigma(stop_at))


# ---------------------------------------------------------------------------------------------
# SD1.5: attention sharing


def _host_attention(q, k, v, heads, transformer_options):
    return comfy_attention.optimized_attention(q, k, v, heads, transformer_options=transformer_options)


def _active_until(stop_sigma: Optional[float]):
    if stop_sigma is None:
        return lambda transformer_options: True

    def active(transformer_options: dict) -> bool:
        sigmas = transformer_options.get("sigmas")
        # the same test ComfyUI applies to a conditioning's end_percent
        return sigmas is None or float(sigmas[0]) >= stop_sigma
    return active


def _first_tensor(conditioning) -> Optional[torch.Tensor]:
    return conditioning[0][0] if conditioning else None


def apply_attention_sharing(model, mode: Mode, strength: float = 1.0, stop_at: float = 1.0,
                            overwrites: Sequence = (), control_image: Optional[torch.Tensor] = None,
                            weight_path: Optional[str] = None):
    """A clone of an SD1.5 `model` whose 32 attention modules share attention across the frames
    of each image. `overwrites[f]`: a text context for frame f's cond rows (or None)."""
    check_family(model, mode)
    if mode.control and control_image is None:
        raise ModelError(f"'{mode.config}' needs the image of the given layer")
    weight_file = WEIGHT_FILES[mode.file]
    path = weight_path or model_store.weight_path(weight_file)
    work = model.clone()
    keys = [UNET_PREFIX + name for name in sharing.SD15_ATTENTION_MODULES]
    originals = []
    for key in keys:
        module = work.get_model_object(key)
        originals.append(module.original if isinstance(module, sharing.SharedAttention) else module)

    def factory():
        return sharing.build_attention_sharing(sharing.shapes_of(originals), mode.frames, mode.control)

    weights = build_model(factory, read_safetensors(path), weight_file.name,
                          device=model_management.unet_offload_device(), dtype=torch.float32)
    unet_dtype = work.model.manual_cast_dtype or work.model.get_dtype()

    control = weights.encode_control(control_image) if mode.control else None

    state = sharing.SharingState(
        frames=mode.frames, strength=float(strength), attention=_host_attention,
        active=_active_until(_stop_sigma(work, stop_at)), overwrites=list(overwrites), control=control,
        label=f"LayerDiffuse '{mode.config}'",
    )
    for key, module in zip(keys, sharing.shared_attention_modules(originals, weights, state, dtype=unet_dtype)):
        work.add_object_patch(key, module)
    # the modules join the UNet when ComfyUI loads it: count them in the size it plans memory with
    # (replacing what an earlier sharing patch on this clone added)
    extra = model_management.module_size(weights)
    work.size = model.model_size() - (model.get_attachment(SHARING_BYTES) or 0) + extra
    work.set_attachments(SHARING_BYTES, extra)
    return work


# ---------------------------------------------------------------------------------------------
# SDXL: weight patches and concat conditioning


def host_patches(patches: Sequence[patch_files.WeightPatch]) -> dict:
    """ComfyUI `add_patches` entries: LoRAs as weight adapters (the tuple form is no longer
    understood), diffs padding the weight when they are wider."""
    out = {}
    for p in patches:
        if p.kind == patch_files.LORA:
            out[p.key] = LoRAAdapter(set(), (p.up, p.down, p.alpha, None, None, None))
        else:
            out[p.key] = ("diff", (p.diff, {"pad_weight": True}))
    return out


def load_patches(model, mode: Mode, weight_path: Optional[str] = None) -> list[patch_files.WeightPatch]:
    """The mode's patch file, parsed and checked against the model's weights."""
    path = weight_path or model_store.weight_path(WEIGHT_FILES[mode.file])
    patches = patch_files.parse_patch_file(read_safetensors(path), mode.file)
    patch_files.check_against_model(patches, declared_shapes(model), mode.file)
    return patches


def apply_weight_patches(model, patches: Sequence[patch_files.WeightPatch], strength: float):
    """A clone of `model` with the patches added at `strength`."""
    work = model.clone()
    applied = set(work.add_patches(host_patches(patches), strength))
    missing = [p.key for p in patches if p.key not in applied]
    if missing:  # check_against_model makes this unreachable unless the host changes
        raise ModelError(f"ComfyUI did not accept patches for: {', '.join(missing[:8])}")
    return work


def apply_stoppable_weight_patches(model, patches: Sequence[patch_files.WeightPatch], strength: float,
                                   stop_at: float):
    """A clone of `model` whose patches act until stop_at and not after. The node has no
    conditioning to carry ComfyUI's weight hook, so an OUTER_SAMPLE wrapper gives it to every
    conditioning the sampler was handed, for the part of its range before stop_at."""
    work, hooks = _stoppable_patches(model, patches, strength)
    work.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                              _hooked_until(hooks, stop_at))
    return work


def _hooked_until(hooks, stop_at: float):
    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        cache = {}
        guider.conds = {name: [part for entry in entries for part in split_at(entry, stop_at, _with_hooks(entry, hooks, cache))]
                        for name, entries in guider.conds.items()}
        _register_weight_hooks(guider)
        return executor(*args, **kwargs)
    return outer_sample


def _register_weight_hooks(guider) -> None:
    """Register the weight hooks now on the guider's conditioning, as ComfyUI does for hooks that
    came with the prompt before this wrapper ran (it re-registers those together with ours)."""
    hooks = comfy.hooks.HookGroup()
    for entries in guider.conds.values():
        comfy.sampler_helpers.get_hooks_from_cond(entries, hooks)
    registered = guider.model_options.get("registered_hooks") or comfy.hooks.HookGroup()
    target = comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model)
    guider.model_options["registered_hooks"] = guider.model_patcher.register_all_hook_patches(
        hooks, target, guider.model_options, registered)


def with_concat(conditioning, c_concat: torch.Tensor, stop_at: float = 1.0, hooks=None):
    """A copy of `conditioning` whose entries feed `c_concat` to the model (cond and uncond alike).
    With stop_at < 1 each entry is split in time: until stop_at it carries the concat (and
    `hooks`, the mode's weight patches), after it the plain entry."""
    out, cache = [], {}
    for tensor, options in conditioning:
        patched = dict(options)
        patched["model_conds"] = {**options.get("model_conds", {}), "c_concat": comfy.conds.CONDRegular(c_concat)}
        if stop_at >= 1.0:
            out.append([tensor, patched])
            continue
        if hooks is not None:
            patched = _with_hooks(patched, hooks, cache)
        out.extend([tensor, part] for part in split_at(options, stop_at, patched))
    return out


def split_at(options: dict, stop_at: float, active: dict) -> list[dict]:
    """One conditioning entry cut in time at stop_at: `active` (the entry with the mode) before
    it, the plain `options` after it; parts outside the entry's own range are left out."""
    start = options.get("start_percent", 0.0)
    end = options.get("end_percent", 1.0)
    split = min(max(stop_at, start), end)
    parts = []
    if split > start:
        parts.append({**active, "start_percent": start, "end_percent": split})
    if split < end:
        parts.append({**options, "start_percent": split, "end_percent": end})
    return parts


def _with_hooks(options: dict, hooks, cache: dict) -> dict:
    """`options` with `hooks` added to any it already has (ComfyUI's own combining, shared
    combinations cached so that entries with equal hooks still batch together)."""
    return comfy.hooks.conditioning_set_values_with_hooks([[None, options]], {"hooks": hooks}, cache=cache)[0][1]


def apply_concat_mode(model, mode: Mode, cond, uncond, latents: Sequence[torch.Tensor], strength: float,
                      stop_at: float = 1.0, weight_path: Optional[str] = None):
    """(model, cond, uncond) for the SDXL layer-conditioning modes: weight patches plus the given
    latents (in the model's latent space) as concat conditioning on cond and uncond."""
    check_family(model, mode)
    patches = load_patches(model, mode, weight_path)
    channels = patch_files.input_channels(patches, CONV_IN_KEY)
    c_concat = model.model.latent_format.process_in(torch.cat([l["samples"] for l in latents], dim=1))
    base_channels = model.model.diffusion_model.input_blocks[0][0].in_channels
    if channels is not None and channels != base_channels + c_concat.shape[1]:
        raise ModelError(
            f"{mode.file} expects {channels - base_channels} concat channels, got {c_concat.shape[1]}")
    if stop_at >= 1.0:
        work = apply_weight_patches(model, patches, strength)
        return work, with_concat(cond, c_concat), with_concat(uncond, c_concat)
    work, hooks = _stoppable_patches(model, patches, strength)
    return work, with_concat(cond, c_concat, stop_at, hooks), with_concat(uncond, c_concat, stop_at, hooks)


def _stoppable_patches(model, patches: Sequence[patch_files.WeightPatch], strength: float):
    """(model clone, hooks) for patches that must switch off mid-sampling. ComfyUI swaps hooked
    weights in and out per conditioning, so the same-shape patches become a weight hook carried by
    the conditioning before stop_at. A widening diff (the input conv) cannot be swapped that way:
    it becomes a `forward_timestep_embed_patch` that uses it only while the input has the concat
    channels, i.e. while the conditioning before stop_at is being sampled."""
    work = model.clone()
    shapes = declared_shapes(model)
    hooked = []
    for p in patches:
        if not p.pads(shapes[p.key]):
            hooked.append(p)
        elif p.key == CONV_IN_KEY:
            work.set_model_patch((torch.nn.Conv2d, _wide_input_conv(p, strength)), "forward_timestep_embed_patch")
        else:
            raise ModelError(f"only the input conv can be widened; {p.key} is {list(shapes[p.key])}")
    hook = comfy.hooks.WeightHook(strength_model=strength, strength_clip=0.0)
    hook.weights = host_patches(hooked)
    hook.need_weight_init = False
    hooks = comfy.hooks.HookGroup()
    hooks.add(hook)
    return work, hooks


def _wide_input_conv(patch: patch_files.WeightPatch, strength: float):
    """A handler for the UNet's bare convs (only the input conv is one): inputs with the diff's
    channel count get the padded, patched weight; all others the conv as it is."""
    def handler(layer, x, *args):
        if x.shape[1] == layer.weight.shape[1] or x.shape[1] != patch.diff.shape[1]:
            return layer(x)
        weight = patch_files.patched_weight(layer.weight, patch, strength).to(x)
        bias = layer.bias.to(x) if layer.bias is not None else None
        return torch.nn.functional.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return handler


def declared_shapes(model) -> dict[str, tuple]:
    """Each UNet weight's shape as its module declares it. The live tensor can be wider: weight
    patches are applied to the one shared model, so while another clone of it is loaded its
    padded input conv is what `state_dict()` shows."""
    shapes = {}
    for key, tensor in model.model_state_dict().items():
        module_name, _, attr = key.rpartition(".")
        module = model.get_model_object(module_name) if module_name else None
        if attr == "weight" and isinstance(module, torch.nn.Conv2d):
            shapes[key] = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        elif attr == "weight" and isinstance(module, torch.nn.Linear):
            shapes[key] = (module.out_features, module.in_features)
        else:
            shapes[key] = tuple(tensor.shape)
    return shapes


# ---------------------------------------------------------------------------------------------
# Nodes


def _config_input(modes: Sequence[Mode]) -> io.Combo.Input:
    return io.Combo.Input("config", options=[m.config for m in modes],
                          tooltip="Which LayerDiffuse mode (and weight file) to use; it must match the model's family.")


def _weight_input() -> io.Float.Input:
    return io.Float.Input("weight", default=1.0, min=-1.0, max=3.0, step=0.05,
                          tooltip="Strength of the LayerDiffuse patch: 0 leaves the model unchanged, 1 is the official strength.")


def _stop_at_input() -> io.Float.Input:
    return io.Float.Input("stop_at", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                          tooltip="Fraction of the sampling after which the model runs unpatched (and without the "
                          "layer conditioning), like Forge's 'Stop At'. 1 keeps the patch to the end.")


def _model_input() -> io.Model.Input:
    return io.Model.Input("model", tooltip="The checkpoint's model (SD1.5 or SDXL, as the config says).")


def _model_output() -> io.Model.Output:
    return io.Model.Output(display_name="MODEL", tooltip="The patched model; the input model is left unchanged.")


def _prompt_inputs() -> list[io.Conditioning.Input]:
    return [io.Conditioning.Input("cond", tooltip="Positive prompt; the given latents are added to it as concat conditioning."),
            io.Conditioning.Input("uncond", tooltip="Negative prompt; gets the same concat conditioning.")]


def _concat_outputs() -> list:
    return [_model_output(),
            io.Conditioning.Output(display_name="CONDITIONING", tooltip="The positive prompt with the latents."),
            io.Conditioning.Output(display_name="CONDITIONING", tooltip="The negative prompt with the latents.")]


class LayeredDiffusionApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionApply",
            display_name="Layer Diffuse Apply",
            category=CATEGORY,
            description="Make the model generate a foreground on a transparent background "
                        "(decode with Layer Diffuse Decode).",
            inputs=[_model_input(), _config_input(APPLY_MODES), _weight_input(), _stop_at_input()],
            outputs=[_model_output()],
        )

    @classmethod
    def execute(cls, model, config, weight, stop_at=1.0) -> io.NodeOutput:
        mode = _mode(APPLY_MODES, config)
        check_family(model, mode)
        if mode.attention_sharing:
            return io.NodeOutput(apply_attention_sharing(model, mode, strength=weight, stop_at=stop_at))
        patches = load_patches(model, mode)
        if stop_at < 1.0:
            return io.NodeOutput(apply_stoppable_weight_patches(model, patches, weight, stop_at))
        return io.NodeOutput(apply_weight_patches(model, patches, weight))


class LayeredDiffusionJointApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionJointApply",
            display_name="Layer Diffuse Joint Apply",
            category=CATEGORY,
            description="SD1.5: generate foreground, background and blended image together; the latent batch "
                        "size must be 3N (each group of 3 is fg, bg, blend).",
            inputs=[
                _model_input(),
                _config_input(JOINT_MODES),
                io.Conditioning.Input("fg_cond", optional=True, tooltip="Prompt for the foreground frames (cond only)."),
                io.Conditioning.Input("bg_cond", optional=True, tooltip="Prompt for the background frames (cond only)."),
                io.Conditioning.Input("blended_cond", optional=True, tooltip="Prompt for the blended frames (cond only)."),
                _stop_at_input(),
            ],
            outputs=[_model_output()],
        )

    @classmethod
    def execute(cls, model, config, fg_cond=None, bg_cond=None, blended_cond=None, stop_at=1.0) -> io.NodeOutput:
        mode = _mode(JOINT_MODES, config)
        overwrites = [_first_tensor(c) for c in (fg_cond, bg_cond, blended_cond)]
        return io.NodeOutput(apply_attention_sharing(model, mode, stop_at=stop_at, overwrites=overwrites))


class LayeredDiffusionCondApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionCondApply",
            display_name="Layer Diffuse Cond Apply",
            category=CATEGORY,
            description="SDXL: generate the blended image around a given foreground or background layer.",
            inputs=[
                _model_input(),
                *_prompt_inputs(),
                io.Latent.Input("latent", tooltip="The given layer, VAE-encoded (same size as the generation)."),
                _config_input(COND_MODES),
                _weight_input(),
                _stop_at_input(),
            ],
            outputs=_concat_outputs(),
        )

    @classmethod
    def execute(cls, model, cond, uncond, latent, config, weight, stop_at=1.0) -> io.NodeOutput:
        mode = _mode(COND_MODES, config)
        return io.NodeOutput(*apply_concat_mode(model, mode, cond, uncond, [latent], weight, stop_at))


class LayeredDiffusionCondJointApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionCondJointApply",
            display_name="Layer Diffuse Cond Joint Apply",
            category=CATEGORY,
            description="SD1.5: given a foreground (or background) image, generate the other layer and the blend "
                        "together; the latent batch size must be 2N.",
            inputs=[
                _model_input(),
                io.Image.Input("image", tooltip="The given layer, at the generation size."),
                _config_input(COND_JOINT_MODES),
                io.Conditioning.Input("cond", optional=True, tooltip="Prompt for the generated layer's frames (cond only)."),
                io.Conditioning.Input("blended_cond", optional=True, tooltip="Prompt for the blended frames (cond only)."),
                _stop_at_input(),
            ],
            outputs=[_model_output()],
        )

    @classmethod
    def execute(cls, model, image, config, cond=None, blended_cond=None, stop_at=1.0) -> io.NodeOutput:
        mode = _mode(COND_JOINT_MODES, config)
        overwrites = [_first_tensor(c) for c in (cond, blended_cond)]
        return io.NodeOutput(apply_attention_sharing(model, mode, stop_at=stop_at, overwrites=overwrites,
                                                     control_image=image))


class LayeredDiffusionDiffApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LayeredDiffusionDiffApply",
            display_name="Layer Diffuse Diff Apply",
            category=CATEGORY,
            description="SDXL: extract the missing layer from a blended image and one given layer.",
            inputs=[
                _model_input(),
                *_prompt_inputs(),
                io.Latent.Input("blended_latent", tooltip="The blended image, VAE-encoded."),
                io.Latent.Input("latent", tooltip="The given layer, VAE-encoded."),
                _config_input(DIFF_MODES),
                _weight_input(),
                _stop_at_input(),
            ],
            outputs=_concat_outputs(),
        )

    @classmethod
    def execute(cls, model, cond, uncond, blended_latent, latent, config, weight, stop_at=1.0) -> io.NodeOutput:
        mode = _mode(DIFF_MODES, config)
        return io.NodeOutput(*apply_concat_mode(model, mode, cond, uncond, [latent, blended_latent], weight, stop_at))


APPLY_NODES = [
    LayeredDiffusionApply,
    LayeredDiffusionJointApply,
    LayeredDiffusionCondApply,
    LayeredDiffusionCondJointApply,
    LayeredDiffusionDiffApply,
]
