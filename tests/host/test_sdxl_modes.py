"""SDXL end to end at a tiny size: every SDXL mode's node patches ComfyUI's real SDXL UNet
(bfloat16, random weights, 2.6 B parameters) and samples through CFGGuider at 64x64, with
reduced synthetic patch files that keep the official key names; stop_at on the SDXL UNet.
Runs after the SD1.5 modules have released their models; skips (fails under CI) where memory
is short."""
from __future__ import annotations

import pytest
import torch

from support.environment import unavailable
from support.sd_models import percent_between, release_models, sample_evals, sample_once, sdxl_model
from support.synth import manifest, synthweights

pytestmark = pytest.mark.sdxl

SDXL_SUBSETS = {  # which entries of each (large) official layout the reduced synthetic files keep
    "layer_xl_transparent_attn": ("output_blocks.2.1.",),
    "layer_xl_transparent_conv": ("input_blocks.0.0.", "input_blocks.1.0.", "middle_block.1.transformer_blocks.0.", "out."),
}
SDXL_NODE_CALLS = [  # (node, config, latents it takes, manifest)
    ("LayeredDiffusionApply", "SDXL, Attention Injection", 0, "layer_xl_transparent_attn"),
    ("LayeredDiffusionApply", "SDXL, Conv Injection", 0, "layer_xl_transparent_conv"),
    ("LayeredDiffusionCondApply", "SDXL, Foreground", 1, "layer_xl_fg2ble"),
    ("LayeredDiffusionCondApply", "SDXL, Background", 1, "layer_xl_bg2ble"),
    ("LayeredDiffusionDiffApply", "SDXL, Foreground", 2, "layer_xl_fgble2bg"),
    ("LayeredDiffusionDiffApply", "SDXL, Background", 2, "layer_xl_bgble2fg"),
]


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


@pytest.fixture(scope="module")
def sdxl_tiny(comfyui_path):
    """ComfyUI's SDXL model in bfloat16 with random weights (2.6 B parameters, 5.2 GB), sampled at
    64x64; skipped where the machine has too little free memory."""
    release_models()
    if _mem_available_gib() < 8:
        unavailable(f"the SDXL UNet needs ~6 GiB plus 2 GiB headroom; {_mem_available_gib():.1f} GiB available")
    return sdxl_model(torch.bfloat16, meta=False)


@pytest.fixture(scope="module")
def sdxl_layer_folder(comfyui_path, tmp_path_factory):
    """Reduced synthetic SDXL patch files (official names, real key names and value recipe)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("sdxl_layer_model")
    default = ("input_blocks.0.0.", "input_blocks.1.0.", "output_blocks.8.0.", "out.")
    for _, _, _, stem in SDXL_NODE_CALLS:
        layout = manifest(stem)
        keep = SDXL_SUBSETS.get(stem, default)
        tensors = {k: torch.from_numpy(synthweights().tensor_values(k, v["shape"])).half()
                   for k, v in layout["tensors"].items() if k.removeprefix("diffusion_model.").startswith(keep)}
        save_file(tensors, str(folder / layout["file"]))
    return folder


@pytest.fixture(scope="module")
def sdxl_inputs():
    gen = torch.Generator().manual_seed(2)
    return {
        "input.noise": torch.randn(1, 4, 8, 8, generator=gen),
        "input.cfg": torch.tensor([5.0]),
        "input.sigma": torch.tensor([2.0]),
        "cond": [[torch.randn(1, 77, 2048, generator=gen) * 0.5, {"pooled_output": torch.randn(1, 1280, generator=gen)}]],
        "uncond": [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]],
        "latents": [{"samples": torch.randn(1, 4, 8, 8, generator=gen)} for _ in range(2)],
    }


def _run_sdxl_node(apply_module, model, inputs, node, config, n_latents, **extra):
    cls = getattr(apply_module, node)
    if n_latents == 0:
        out = cls.execute(model, config, 1.0, **extra).result
        return out[0], inputs["cond"], inputs["uncond"]
    latents = inputs["latents"][:n_latents]
    if n_latents == 1:
        return cls.execute(model, inputs["cond"], inputs["uncond"], latents[0], config, 1.0, **extra).result
    return cls.execute(model, inputs["cond"], inputs["uncond"], latents[1], latents[0], config, 1.0, **extra).result


@pytest.mark.parametrize("node,config,n_latents,stem", SDXL_NODE_CALLS, ids=[f"{c[0]}:{c[1]}" for c in SDXL_NODE_CALLS])
def test_sdxl_modes_sample_end_to_end(apply_module, sdxl_tiny, sdxl_layer_folder, sdxl_inputs, node, config, n_latents, stem):
    import folder_paths

    folder_paths.add_model_folder_path("layer_model", str(sdxl_layer_folder), is_default=True)
    plain = sample_once(sdxl_tiny, sdxl_inputs, cond=sdxl_inputs["cond"], uncond=sdxl_inputs["uncond"])
    model, cond, uncond = _run_sdxl_node(apply_module, sdxl_tiny, sdxl_inputs, node, config, n_latents)
    out = sample_once(model, sdxl_inputs, cond=cond, uncond=uncond)
    assert torch.isfinite(out).all()
    assert (out - plain).abs().mean() > 1e-2 * plain.abs().mean()  # the patches act
    assert torch.equal(sample_once(sdxl_tiny, sdxl_inputs, cond=sdxl_inputs["cond"], uncond=sdxl_inputs["uncond"]), plain)


# stop_at is one sampling wrapper for every SDXL mode: one mode of each kind of patch file (weights
# only, weights + one concatenated latent, weights + two) shows it on the real UNet.
STOP_AT_CALLS = [call for call in SDXL_NODE_CALLS
                 if call[3] in ("layer_xl_transparent_conv", "layer_xl_fg2ble", "layer_xl_bgble2fg")]


@pytest.mark.parametrize("node,config,n_latents,stem", STOP_AT_CALLS, ids=[c[3] for c in STOP_AT_CALLS])
def test_sdxl_stop_at_on_the_sdxl_unet(apply_module, sdxl_tiny, sdxl_layer_folder, sdxl_inputs, node, config, n_latents, stem):
    import folder_paths

    folder_paths.add_model_folder_path("layer_model", str(sdxl_layer_folder), is_default=True)
    high, low = 2.0, 0.5
    stop = percent_between(sdxl_tiny, high, low)
    plain = sample_evals(sdxl_tiny, sdxl_inputs, [high, low], sdxl_inputs["cond"], sdxl_inputs["uncond"])
    model, cond, uncond = _run_sdxl_node(apply_module, sdxl_tiny, sdxl_inputs, node, config, n_latents)
    full = sample_evals(model, sdxl_inputs, [high, low], cond, uncond)
    model, cond, uncond = _run_sdxl_node(apply_module, sdxl_tiny, sdxl_inputs, node, config, n_latents, stop_at=stop)
    stopping = sample_evals(model, sdxl_inputs, [high, low], cond, uncond)
    scale = full[0].abs().max()
    assert (stopping[0] - full[0]).abs().max() < 2e-2 * scale  # bf16 weights: rounding differs slightly
    assert torch.equal(stopping[1], plain[1])
    assert (full[1] - plain[1]).abs().mean() > 1e-2 * plain[1].abs().mean()
