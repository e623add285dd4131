"""SD1.5 attention sharing in the real ComfyUI: our patches reproduce the reference's recorded
model calls (goldens) with float32 and float16 checkpoint weights."""
from __future__ import annotations

import pytest
import torch

from support.sd_models import SD15_GOLDENS, golden_patch, load_sd15_model, replay_apply_model, sample_once
from support.synth import golden, synthetic_file

ATOL = 1e-4  # float32, the testkit's tolerance; the reference moves 2e-5 when its batch is split


@pytest.mark.parametrize("stem", sorted(SD15_GOLDENS))
def test_golden_parity(sd15_model, stem):
    meta, g = golden(stem)
    patched = golden_patch(stem, sd15_model, g)
    # the node-level x0 prediction, then the whole CFG sampling call the golden records
    direct = replay_apply_model(patched, g, "patched")
    assert (direct - g["patched.apply_model.0.output"]).abs().max() < ATOL
    final = sample_once(patched, g)
    scale = float(g["input.cfg"][0]) / 0.18215  # final = CFG-combined x0 / scale factor
    assert (final - g["patched.final"]).abs().max() < ATOL * scale
    assert (final - g["unpatched.final"]).abs().max() > 1.0  # the patch really acts


@pytest.fixture(scope="module")
def sd15_model_fp16_weights(pack):
    """The checkpoint loaded with float16 UNet weights: on the CPU ComfyUI computes in float32
    from them ("manual cast"), the path GPUs without fast fp16 take."""
    return load_sd15_model(synthetic_file("sd15_checkpoint"), dtype=torch.float16)


def test_golden_parity_with_float16_weights(sd15_model_fp16_weights):
    stem = "sd15_fg2bg_seed0"  # the golden's checkpoint is float16 on disk, so the values are the same
    meta, g = golden(stem)
    patched = golden_patch(stem, sd15_model_fp16_weights, g)
    compute = sd15_model_fp16_weights.model.manual_cast_dtype or torch.float16
    unit = patched.object_patches["diffusion_model.middle_block.1.transformer_blocks.0.attn2"]
    assert next(unit.sharing.parameters()).dtype == compute
    final = sample_once(patched, g)
    tolerance = ATOL if compute == torch.float32 else 5e-2
    assert (final - g["patched.final"]).abs().max() < tolerance * float(g["input.cfg"][0]) / 0.18215
