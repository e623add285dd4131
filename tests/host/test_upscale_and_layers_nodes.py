"""Upscale (RGBA) and Save Layers inside a real ComfyUI (in-process, CPU): registration, resampling,
a real spandrel upscale model loaded by core's loader, tiling, batches, files in the output folder
with ComfyUI's counters and metadata, previews, and the LAYERS document through core's Create
Layered Image where the host has that type."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from support.pack import pack_module

UPSCALE = "LayeredDiffusionUpscaleRGBA"
SAVE = "LayeredDiffusionSaveLayers"
GREEN = torch.tensor([0.1, 0.8, 0.2])
MAGENTA = torch.tensor([1.0, 0.0, 1.0])
VISIBLE = 0.05
TOLERANCE = 1e-3


def node(pack, node_id):
    return pack.NODE_CLASS_MAPPINGS[node_id]


def green_discs(batch: int = 2, size: int = 32) -> torch.Tensor:
    """RGBA [B,H,W,4]: antialiased green discs of growing radius; transparent pixels hold magenta."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    distance = ((ys - size / 2) ** 2 + (xs - size / 2) ** 2).sqrt()
    images = []
    for i in range(batch):
        alpha = (size / 4 + 2 * i + 0.5 - distance).clamp(0, 1)[..., None]
        images.append(torch.cat([torch.where(alpha > 0, GREEN, MAGENTA), alpha], dim=-1))
    return torch.stack(images)


def fringe(rgba: torch.Tensor) -> float:
    visible = rgba[..., 3] > VISIBLE
    assert visible.any() and not visible.all()
    return float((rgba[..., :3] - GREEN).abs()[visible].max())


def run_upscale(pack, image, upscale_method="lanczos", scale_by=2.0, width=0, height=0, crop="disabled", **optional):
    result = node(pack, UPSCALE).execute(image=image, upscale_method=upscale_method, scale_by=scale_by,
                                         width=width, height=height, crop=crop, **optional)
    image, mask = result.result
    torch.testing.assert_close(mask, image[..., 3])
    return image


# --- registration ---------------------------------------------------------------------------------

@pytest.mark.registration
def test_nodes_register_through_comfyui_loader(pack):
    for node_id in (UPSCALE, SAVE):
        schema = node(pack, node_id).define_schema()
        assert schema.category == "layer_diffuse"
        assert all(i.tooltip for i in schema.inputs), f"{node_id} has inputs without tooltips"
    assert node(pack, SAVE).define_schema().is_output_node


# --- resampling -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"])
def test_resampling_keeps_batch_and_leaves_no_fringe(pack, method):
    out = run_upscale(pack, green_discs(), method)
    assert out.shape == (2, 64, 64, 4) and out.dtype == torch.float32
    for image in out:
        assert fringe(image) < TOLERANCE
    invisible = out[..., 3] <= 0.5 / 255
    assert float((out[..., :3] - GREEN).abs()[invisible].max()) < TOLERANCE  # bled colour, not magenta


def test_rgb_and_loadimage_mask_give_the_same_result(pack):
    rgba = green_discs()
    from_rgba = run_upscale(pack, rgba, "bicubic")
    from_mask = run_upscale(pack, rgba[..., :3], "bicubic", mask=1.0 - rgba[..., 3])
    torch.testing.assert_close(from_mask, from_rgba)


def test_sizes_follow_comfyui_upscale_image(pack):
    rgba = green_discs(1)[:, :, :24]  # 24 wide, 32 high
    assert run_upscale(pack, rgba, scale_by=1.5).shape == (1, 48, 36, 4)
    assert run_upscale(pack, rgba, width=48).shape == (1, 64, 48, 4)
    assert run_upscale(pack, rgba, height=16).shape == (1, 16, 12, 4)
    assert run_upscale(pack, rgba, width=40, height=40).shape == (1, 40, 40, 4)
    stretched = run_upscale(pack, rgba, "nearest-exact", width=24, height=24)
    cropped = run_upscale(pack, rgba, "nearest-exact", width=24, height=24, crop="center")
    middle = rgba[:, 4:28]
    torch.testing.assert_close(cropped[..., 3], middle[..., 3])
    shown = middle[..., 3] > 0
    torch.testing.assert_close(cropped[..., :3][shown], middle[..., :3][shown])
    assert not torch.equal(stretched, cropped)


def test_too_large_an_output_is_an_error(pack):
    errors = pack_module("lib_layerdiffuse.errors")
    with pytest.raises(errors.InputError, match="16384"):
        run_upscale(pack, green_discs(1), width=20000)


# --- upscale model ----------------------------------------------------------------------------------

def compact_state_dict(channels: int = 3) -> dict:
    """A real spandrel SRVGGNetCompact (2x) set to blur 3x3 and enlarge: a linear model that mixes
    neighbours, so that straight colour would bleed into the edges. Features: 0..c-1 the blurred
    image, c..2c-1 the image; the last convolution gives blur - image, and the network adds the
    nearest-upscaled image."""
    from spandrel.architectures.Compact import Compact

    model = Compact(num_in_ch=channels, num_out_ch=channels, num_feat=2 * channels, num_conv=1, upscale=2)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for c in range(channels):
        state["body.0.weight"][c, c] = 1 / 9
        state["body.0.weight"][channels + c, c, 1, 1] = 1
        state["body.2.weight"][c, c, 1, 1] = 1
        state["body.2.weight"][channels + c, channels + c, 1, 1] = 1
        for sub in range(4):
            state["body.4.weight"][4 * c + sub, c, 1, 1] = 1
            state["body.4.weight"][4 * c + sub, channels + c, 1, 1] = -1
    for key in ("body.1.weight", "body.3.weight"):
        state[key] = torch.ones_like(state[key])  # PReLU slope 1: the identity
    return state


@pytest.fixture()
def load_upscale_model(pack, tmp_path, monkeypatch):
    """factory(channels) -> the model as core's Load Upscale Model gives it, from a file."""
    import folder_paths
    from safetensors.torch import save_file

    from comfy_extras.nodes_upscale_model import UpscaleModelLoader

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "upscale_models", ([str(tmp_path)], {".safetensors"}))

    def load(channels: int = 3):
        name = f"compact_blur_{channels}.safetensors"
        save_file(compact_state_dict(channels), str(tmp_path / name))
        return UpscaleModelLoader.execute(name).result[0]

    return load


def test_model_upscale_leaves_no_fringe(pack, load_upscale_model):
    model = load_upscale_model()
    rgba = green_discs()
    out = run_upscale(pack, rgba, scale_by=2.0, upscale_model=model)
    assert out.shape == (2, 64, 64, 4)
    for image in out:
        assert fringe(image) < TOLERANCE
    # The same model on straight colour, as core's Upscale Image (using Model) would run it.
    straight = model(rgba[..., :3].movedim(-1, 1))
    alpha = model(rgba[..., 3:].movedim(-1, 1).expand(-1, 3, -1, -1)).mean(1, keepdim=True)
    assert fringe(torch.cat([straight, alpha], dim=1).movedim(1, -1)[0]) > 0.2


def test_model_output_is_resized_to_the_size_asked_for(pack, load_upscale_model):
    model = load_upscale_model()
    out = run_upscale(pack, green_discs(), "area", scale_by=1.5, upscale_model=model)
    assert out.shape == (2, 48, 48, 4)
    assert fringe(out[0]) < TOLERANCE and fringe(out[1]) < TOLERANCE
    assert run_upscale(pack, green_discs(1), width=100, upscale_model=model).shape == (1, 100, 100, 4)


def test_tiled_model_upscale_matches_one_tile(pack, load_upscale_model, monkeypatch):
    import comfy.utils

    model = load_upscale_model()
    rgba = green_discs(2, 48)
    whole = run_upscale(pack, rgba, upscale_model=model)
    totals = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: totals.append(total))
    upscale = pack_module("nodes.upscale")
    monkeypatch.setattr(upscale, "TILE", 24)
    monkeypatch.setattr(upscale, "TILE_OVERLAP", 8)
    tiled = run_upscale(pack, rgba, upscale_model=model)
    # Colour and alpha of 2 images, 3x3 tiles of 24 (step 16) each.
    assert max(totals) == 4 * comfy.utils.get_tiled_scale_steps(48, 48, 24, 24, 8) == 36
    # ComfyUI's tiles are zero-padded at their seams and feathered: close to one tile, slightly
    # darker along the seams, and still nothing of the magenta under the transparent pixels.
    assert (tiled - whole).abs().max() < 0.1 and (tiled - whole).abs().mean() < 5e-3
    visible = tiled[..., 3] > VISIBLE
    assert float((tiled[..., :3] - GREEN)[visible].max()) < TOLERANCE


def test_a_non_rgb_model_is_refused(pack, load_upscale_model):
    errors = pack_module("lib_layerdiffuse.errors")
    with pytest.raises(errors.ModelError, match="3-channel"):
        run_upscale(pack, green_discs(1), upscale_model=load_upscale_model(1))


@pytest.mark.parametrize("with_model", [False, True])
def test_interruption_is_honoured(pack, load_upscale_model, with_model):
    import comfy.model_management as model_management

    optional = {"upscale_model": load_upscale_model()} if with_model else {}
    model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            run_upscale(pack, green_discs(), **optional)
    finally:
        model_management.interrupt_current_processing(False)


# --- Save Layers -----------------------------------------------------------------------------------

PROMPT = {"1": {"class_type": SAVE, "inputs": {"filename_prefix": "layerdiffuse/layers"}}}
WORKFLOW = {"nodes": [{"id": 1, "type": SAVE}]}


@pytest.fixture()
def output_dir(pack, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    return tmp_path / "output"


def layer_images(batch: int = 1, size: tuple[int, int] = (24, 40)) -> dict:
    generator = torch.Generator().manual_seed(batch)
    height, width = size
    foreground = torch.rand(batch, height, width, 4, generator=generator)
    foreground[:, : height // 2, :, 3] = 0
    foreground[:, height // 2 :, : width // 2, 3] = 1
    return {"foreground": foreground,
            "background": torch.rand(batch, height, width, 3, generator=generator),
            "blended": torch.rand(batch, height, width, 3, generator=generator)}


def save_layers(pack, layered_format="PSD + OpenRaster", hidden=True, **images):
    cls = node(pack, SAVE)
    if hidden:
        cls = cls.PREPARE_CLASS_CLONE({"hidden_inputs": {"PROMPT": PROMPT, "EXTRA_PNGINFO": {"workflow": WORKFLOW}}})
    return cls.execute(filename_prefix="layerdiffuse/layers", layered_format=layered_format, **images)


def rgba8(image: torch.Tensor) -> np.ndarray:
    if image.shape[-1] == 3:
        image = torch.cat([image, torch.ones_like(image[..., :1])], dim=-1)
    return np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)


def test_save_writes_layers_psd_and_ora_with_counters(pack, output_dir):
    import psd_tools  # a test requirement (tests/requirements.txt)

    images = layer_images(batch=2)
    result = save_layers(pack, **images)
    folder = output_dir / "layerdiffuse"
    names = ["background", "foreground", "blended"]
    expected = [f"layers_{n:05}_{name}.png" for n in (1, 2) for name in names]
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(expected)
    assert sorted(p.name for p in folder.glob("*.psd")) == ["layers_00001_.psd", "layers_00002_.psd"]
    assert sorted(p.name for p in folder.glob("*.ora")) == ["layers_00001_.ora", "layers_00002_.ora"]
    assert result.ui.as_dict()["images"] == [
        {"filename": name, "subfolder": "layerdiffuse", "type": "output"} for name in expected]
    for i in range(2):
        saved = {name: rgba8(images[name][i]) for name in names}
        for name in names:
            png = Image.open(folder / f"layers_{i + 1:05}_{name}.png")
            assert png.mode == "RGBA"
            np.testing.assert_array_equal(np.asarray(png), saved[name])
            assert json.loads(png.info["prompt"]) == PROMPT and json.loads(png.info["workflow"]) == WORKFLOW
        psd = psd_tools.PSDImage.open(folder / f"layers_{i + 1:05}_.psd")
        assert psd.size == (40, 24)
        assert [(layer.name, layer.visible) for layer in psd] == [
            ("background", True), ("foreground", True), ("blended", False)]
        for layer in psd:
            np.testing.assert_array_equal(np.asarray(layer.topil()), saved[layer.name])
        with zipfile.ZipFile(folder / f"layers_{i + 1:05}_.ora") as ora:
            assert ora.namelist()[0] == "mimetype" and b'name="foreground"' in ora.read("stack.xml")
    # ComfyUI's counter continues after the files already there.
    save_layers(pack, layered_format="PSD", foreground=images["foreground"][:1])
    assert (folder / "layers_00003_foreground.png").is_file() and (folder / "layers_00003_.psd").is_file()
    assert not (folder / "layers_00003_.ora").exists() and not (folder / "layers_00003_background.png").exists()


def test_save_respects_disable_metadata(pack, output_dir, monkeypatch):
    from comfy.cli_args import args

    monkeypatch.setattr(args, "disable_metadata", True)
    save_layers(pack, layered_format="OpenRaster", foreground=layer_images()["foreground"])
    png = Image.open(output_dir / "layerdiffuse" / "layers_00001_foreground.png")
    assert "prompt" not in png.info and "workflow" not in png.info
    assert (output_dir / "layerdiffuse" / "layers_00001_.ora").is_file()


def test_rgb_foreground_with_mask(pack, output_dir):
    rgba = layer_images()["foreground"]
    save_layers(pack, foreground=rgba[..., :3], foreground_mask=1.0 - rgba[..., 3], layered_format="PSD")
    png = Image.open(output_dir / "layerdiffuse" / "layers_00001_foreground.png")
    np.testing.assert_array_equal(np.asarray(png)[..., 3], rgba8(rgba[0])[..., 3])


def test_mismatched_inputs_are_refused(pack, output_dir):
    errors = pack_module("lib_layerdiffuse.errors")
    images = layer_images(batch=2)
    with pytest.raises(errors.InputError, match="same size"):
        save_layers(pack, foreground=images["foreground"], background=images["background"][:, :20])
    with pytest.raises(errors.InputError, match="batches"):
        save_layers(pack, foreground=images["foreground"], blended=torch.cat([images["blended"]] * 2)[:3])
    assert not list(output_dir.rglob("*.png"))


def test_layers_output_matches_the_host(pack, output_dir):
    from comfy_api.latest import io as comfy_io

    schema = node(pack, SAVE).define_schema()
    result = save_layers(pack, **layer_images())
    if hasattr(comfy_io, "Layers"):
        assert [output.io_type for output in schema.outputs] == ["LAYERS"]
        assert isinstance(result.result[0], dict)
    else:
        assert schema.outputs == [] and not result.result
    assert len(result.ui.as_dict()["images"]) == 3


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def test_layers_document_through_create_layered_image(pack, output_dir):
    from comfy_api.latest import io as comfy_io

    if not hasattr(comfy_io, "Layers"):  # 0.8.0: no LAYERS output, the files are still written
        assert node(pack, SAVE).GET_SCHEMA().outputs == []
        result = save_layers(pack, **layer_images())
        assert not result.result and result.ui.as_dict()["images"]
        return
    from comfy_extras.nodes_compositor import ImageCompositor

    images = layer_images()
    document = save_layers(pack, **images).result[0]
    assert document["version"] == 1 and tuple(document["canvas"]) == (40, 24)
    assert [(item["name"], item["visible"], item["z_index"]) for item in document["layers"]] == [
        ("background", True, 0), ("foreground", True, 1), ("blended", False, 2)]
    out, mask = ImageCompositor.execute(layers=document).result
    # Create Layered Image rounds the layers to 8 bits and stacks them in linear light: the
    # foreground over the opaque background.
    fg, bg = (np.rint(255 * images[name][0].numpy()) / 255 for name in ("foreground", "background"))
    alpha = fg[..., 3:]
    expected = linear_to_srgb(srgb_to_linear(fg[..., :3]) * alpha + srgb_to_linear(bg[..., :3]) * (1 - alpha))
    assert out.shape == (1, 24, 40, 3) and not mask.any()
    np.testing.assert_allclose(out[0].numpy(), expected, atol=2 / 255)

    batch = save_layers(pack, **layer_images(batch=2)).result[0]
    assert [item["name"] for item in batch["layers"]] == [
        "background 1", "foreground 1", "blended 1", "background 2", "foreground 2", "blended 2"]
    assert [item["image"].shape for item in batch["layers"]] == [(1, 24, 40, 4)] * 6
