"""The five "Layer Diffuse ... Apply" nodes: a LayerDiffuse generation mode on a model.

Node ids, input names and order, combo strings and outputs are those of
huchenlei/ComfyUI-layerdiffuse (workflows saved with it open unchanged); new inputs come after the
old ones. The host glue is in sd15_sharing.py (SD1.5) and sdxl_patches.py (SDXL).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from comfy_api.latest import io

from ..lib_layerdiffuse.weight_files import SD15
from . import model_store
from .host_compat import schema
from .modes import APPLY_MODES, COND_JOINT_MODES, COND_MODES, DIFF_MODES, JOINT_MODES, Mode, check_family, find_mode
from .sd15_sharing import apply_attention_sharing
from .naming import CATEGORY, SEARCH_ALIASES
from .sdxl_patches import apply_concat_mode, apply_mode_patches, load_patches


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


def _concat_outputs() -> list[io.Output]:
    return [_model_output(),
            io.Conditioning.Output(display_name="CONDITIONING", tooltip="The positive prompt with the latents."),
            io.Conditioning.Output(display_name="CONDITIONING", tooltip="The negative prompt with the latents.")]


def _first_tensor(conditioning: Optional[list]) -> Optional[torch.Tensor]:
    return conditioning[0][0] if conditioning else None


def _mode(modes: Sequence[Mode], config: str, model: io.Model.Type, node: type[io.ComfyNode]) -> Mode:
    """The chosen mode, once the model is known to be of its family (else an error naming the node)."""
    mode = find_mode(modes, config)
    check_family(model, mode, node.define_schema().display_name)
    return mode


def _files_by_config(modes: Sequence[Mode]) -> dict:
    return {mode.config: mode.weight_file for mode in modes}


def _weight_file_problem(modes: Sequence[Mode], config: str | None) -> bool | str:
    return model_store.validate_file_choice("config", config, _files_by_config(modes))


def _weight_file_fingerprint(modes: Sequence[Mode], config: str | None) -> tuple:
    return model_store.chosen_file_fingerprint(config, _files_by_config(modes))


class LayeredDiffusionApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionApply",
            display_name="Layer Diffuse Apply",
            category=CATEGORY,
            search_aliases=SEARCH_ALIASES,
            description="Make the model generate a foreground on a transparent background "
                        "(decode with Layer Diffuse Decode).",
            inputs=[_model_input(), _config_input(APPLY_MODES), _weight_input(), _stop_at_input()],
            outputs=[_model_output()],
        )

    @classmethod
    def validate_inputs(cls, config: str | None = None) -> bool | str:
        return _weight_file_problem(APPLY_MODES, config)

    @classmethod
    def fingerprint_inputs(cls, config: str | None = None, **_) -> tuple:
        return _weight_file_fingerprint(APPLY_MODES, config)

    @classmethod
    def execute(cls, model: io.Model.Type, config: str, weight: float, stop_at: float = 1.0) -> io.NodeOutput:
        mode = _mode(APPLY_MODES, config, model, cls)
        if mode.family == SD15:
            return io.NodeOutput(apply_attention_sharing(model, mode, strength=weight, stop_at=stop_at))
        return io.NodeOutput(apply_mode_patches(model, mode, load_patches(model, mode), weight, stop_at))


class LayeredDiffusionJointApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionJointApply",
            display_name="Layer Diffuse Joint Apply",
            category=CATEGORY,
            search_aliases=SEARCH_ALIASES,
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
    def validate_inputs(cls, config: str | None = None) -> bool | str:
        return _weight_file_problem(JOINT_MODES, config)

    @classmethod
    def fingerprint_inputs(cls, config: str | None = None, **_) -> tuple:
        return _weight_file_fingerprint(JOINT_MODES, config)

    @classmethod
    def execute(cls, model: io.Model.Type, config: str, fg_cond: io.Conditioning.Type = None,
                bg_cond: io.Conditioning.Type = None, blended_cond: io.Conditioning.Type = None,
                stop_at: float = 1.0) -> io.NodeOutput:
        mode = _mode(JOINT_MODES, config, model, cls)
        overwrites = [_first_tensor(c) for c in (fg_cond, bg_cond, blended_cond)]
        return io.NodeOutput(apply_attention_sharing(model, mode, stop_at=stop_at, overwrites=overwrites))


class LayeredDiffusionCondApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionCondApply",
            display_name="Layer Diffuse Cond Apply",
            category=CATEGORY,
            search_aliases=SEARCH_ALIASES,
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
    def validate_inputs(cls, config: str | None = None) -> bool | str:
        return _weight_file_problem(COND_MODES, config)

    @classmethod
    def fingerprint_inputs(cls, config: str | None = None, **_) -> tuple:
        return _weight_file_fingerprint(COND_MODES, config)

    @classmethod
    def execute(cls, model: io.Model.Type, cond: io.Conditioning.Type, uncond: io.Conditioning.Type,
                latent: io.Latent.Type, config: str, weight: float, stop_at: float = 1.0) -> io.NodeOutput:
        mode = _mode(COND_MODES, config, model, cls)
        return io.NodeOutput(*apply_concat_mode(model, mode, cond, uncond, [latent], weight, stop_at))


class LayeredDiffusionCondJointApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionCondJointApply",
            display_name="Layer Diffuse Cond Joint Apply",
            category=CATEGORY,
            search_aliases=SEARCH_ALIASES,
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
    def validate_inputs(cls, config: str | None = None) -> bool | str:
        return _weight_file_problem(COND_JOINT_MODES, config)

    @classmethod
    def fingerprint_inputs(cls, config: str | None = None, **_) -> tuple:
        return _weight_file_fingerprint(COND_JOINT_MODES, config)

    @classmethod
    def execute(cls, model: io.Model.Type, image: io.Image.Type, config: str, cond: io.Conditioning.Type = None,
                blended_cond: io.Conditioning.Type = None, stop_at: float = 1.0) -> io.NodeOutput:
        mode = _mode(COND_JOINT_MODES, config, model, cls)
        overwrites = [_first_tensor(c) for c in (cond, blended_cond)]
        return io.NodeOutput(apply_attention_sharing(model, mode, stop_at=stop_at, overwrites=overwrites,
                                                     control_image=image))


class LayeredDiffusionDiffApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="LayeredDiffusionDiffApply",
            display_name="Layer Diffuse Diff Apply",
            category=CATEGORY,
            search_aliases=SEARCH_ALIASES,
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
    def validate_inputs(cls, config: str | None = None) -> bool | str:
        return _weight_file_problem(DIFF_MODES, config)

    @classmethod
    def fingerprint_inputs(cls, config: str | None = None, **_) -> tuple:
        return _weight_file_fingerprint(DIFF_MODES, config)

    @classmethod
    def execute(cls, model: io.Model.Type, cond: io.Conditioning.Type, uncond: io.Conditioning.Type,
                blended_latent: io.Latent.Type, latent: io.Latent.Type, config: str, weight: float,
                stop_at: float = 1.0) -> io.NodeOutput:
        mode = _mode(DIFF_MODES, config, model, cls)
        return io.NodeOutput(*apply_concat_mode(model, mode, cond, uncond, [latent, blended_latent], weight, stop_at))


APPLY_NODES = [
    LayeredDiffusionApply,
    LayeredDiffusionJointApply,
    LayeredDiffusionCondApply,
    LayeredDiffusionCondJointApply,
    LayeredDiffusionDiffApply,
]
