"""Upscale (RGBA) and Save Layers inside a real ComfyUI (in-process, CPU): registration, resampling,
a real spandrel upscale model loaded by core's loader, tiling, batches, files in the output folder
with ComfyUI's counters and metadata, previews, the LAYERS document through core's Create
Layered Image where the host has that type, and transparent images from core's own nodes (Load
Image of an RGBA PNG, Join Image with Alpha, a 4-channel VAE, Add Layer) through both nodes."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from support.pack import pack_module
from support.upscale_models import write_compact_model

UPSCALE = "LayeredDiffusionUpscaleRGBA"
SAVE = "LayeredDiffusionSaveLayers"
UPSCALE_LAYERS = "LayeredDiffusionUpscaleLayers"
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


def fringe(rgba: torch.Tensor, colour: torch.Tensor = GREEN) -> float:
    """The largest difference from `colour` (that of every visible pixel of the source) of a
    visible pixel's colour."""
    visible = rgba[..., 3] > VISIBLE
    assert visible.any() and not visible.all()
    return float((rgba[..., :3] - colour).abs()[visible].max())


def run_upscale(pack, image, upscale_method="lanczos", scale_by=2.0, width=0, height=0, crop="disabled", **optional):
    result = node(pack, UPSCALE).execute(image=image, upscale_method=upscale_method, scale_by=scale_by,
                                         width=width, height=height, crop=crop, **optional)
    image, mask = result.result
    torch.testing.assert_close(mask, image[..., 3])
    return image


# --- registration ---------------------------------------------------------------------------------

@pytest.mark.registration
def test_nodes_register_through_comfyui_loader(pack):
    from comfy_api.latest import io as comfy_io

    layers_node = hasattr(comfy_io, "Layers")
    assert (UPSCALE_LAYERS in pack.NODE_CLASS_MAPPINGS) == layers_node
    for node_id in (UPSCALE, SAVE, *([UPSCALE_LAYERS] if layers_node else [])):
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

@pytest.fixture()
def load_upscale_model(pack, tmp_path, monkeypatch):
    """factory(channels) -> the model as core's Load Upscale Model gives it, from a file."""
    import folder_paths

    from comfy_extras.nodes_upscale_model import UpscaleModelLoader

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "upscale_models", ([str(tmp_path)], {".safetensors"}))

    def load(channels: int = 3):
        name = f"compact_blur_{channels}.safetensors"
        write_compact_model(tmp_path / name, channels)
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


def save_layers(pack, layered_format="PSD + OpenRaster", hidden=True, filename_prefix="layerdiffuse/layers", **images):
    cls = node(pack, SAVE)
    if hidden:
        cls = cls.PREPARE_CLASS_CLONE({"hidden_inputs": {"PROMPT": PROMPT, "EXTRA_PNGINFO": {"workflow": WORKFLOW}}})
    return cls.execute(filename_prefix=filename_prefix, layered_format=layered_format, **images)


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


@pytest.mark.parametrize("prefix", ["../x", "layerdiffuse/../../x", "/tmp/layerdiffuse_escape/x"])
def test_a_prefix_out_of_the_output_folder_is_refused(pack, output_dir, prefix):
    errors = pack_module("lib_layerdiffuse.errors")
    output_dir.mkdir()
    with pytest.raises(errors.InputError, match="leads out of ComfyUI's output folder"):
        save_layers(pack, filename_prefix=prefix, **layer_images())
    assert not [p for p in output_dir.parent.rglob("*") if p.is_file()]
    assert not any(p.suffix in (".png", ".psd", ".ora") for p in output_dir.parent.parent.glob("x*"))


def test_nothing_or_both_connected_is_refused(pack, output_dir):
    errors = pack_module("lib_layerdiffuse.errors")
    with pytest.raises(errors.InputError, match="nothing to save"):
        save_layers(pack)


# --- transparent images from core's own nodes ------------------------------------------------------

def load_image_source(tmp_path, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(IMAGE, MASK, visible colour) of an RGBA PNG of green discs read by core's Load Image."""
    import folder_paths
    import nodes as comfy_nodes

    rgba = np.round(255 * green_discs(1)[0].numpy()).astype(np.uint8)
    (tmp_path / "input").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "input" / "discs.png")
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path / "input"))
    image, mask = comfy_nodes.LoadImage().load_image("discs.png")
    assert image.shape == (1, 32, 32, 3) and mask.shape == (1, 32, 32)
    return image, mask, torch.round(GREEN * 255) / 255


def joined_source() -> tuple[torch.Tensor, None, torch.Tensor]:
    """A 4-channel IMAGE from core's Join Image with Alpha (its alpha input is a MASK)."""
    from comfy_extras.nodes_compositing import JoinImageWithAlpha

    rgba = green_discs()
    image = JoinImageWithAlpha.execute(image=rgba[..., :3], alpha=1.0 - rgba[..., 3]).result[0]
    assert image.shape == (2, 32, 32, 4)
    return image, None, GREEN


def four_channel_vae():
    """Core's VAE of the Wan 2.1 layout with 4 image channels (the RGBA layout of Qwen-Image's VAE:
    ComfyUI reads the channel count from encoder.conv1.weight), from small random weights. Its
    last convolution is set so that the decode is green wherever it is visible (alpha grows from 0
    only where green is saturated) and runs through grey to magenta under the transparent pixels."""
    import inspect

    import comfy.sd
    from comfy.ldm.wan.vae import WanVAE

    config = dict(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], image_channels=4)
    if "conv_out_channels" in inspect.signature(WanVAE).parameters:  # ComfyUI 0.3x
        config["conv_out_channels"] = 4
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, value in WanVAE(**config).state_dict().items():  # core's layers leave weights uninitialised
        if key.endswith("gamma"):
            state[key] = torch.ones_like(value)
        elif key.endswith("weight"):
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
        else:
            state[key] = torch.zeros_like(value)
    head = state["decoder.head.2.weight"]
    feature = head[0].clone()
    state["decoder.head.2.weight"] = torch.stack([feature] * 4)
    vae = comfy.sd.VAE(sd=state)
    latent = torch.randn(1, 16, 1, 8, 8, generator=generator)
    with torch.inference_mode():
        spread = float(vae.first_stage_model.decode(latent)[:, 0].std())
    # Decoded value x is shown as (x + 1) / 2: red and blue fall, green and alpha rise with the feature.
    scale = 3.0 / spread
    state["decoder.head.2.weight"] = torch.stack([-scale * feature, scale * feature, -scale * feature, scale * feature])
    state["decoder.head.2.bias"] = torch.tensor([0.0, 0.0, 0.0, -2.0])
    return comfy.sd.VAE(sd=state), latent


def vae_source() -> tuple[torch.Tensor, None, torch.Tensor]:
    """A 4-channel IMAGE from core's VAE Decode of a 4-channel VAE."""
    import nodes as comfy_nodes

    vae, latent = four_channel_vae()
    assert vae.output_channels == 4
    with torch.inference_mode():  # as ComfyUI runs a prompt
        image = comfy_nodes.VAEDecode().decode(vae, {"samples": latent})[0]
    assert image.shape == (1, 64, 64, 4)
    visible = image[..., 3] > 0
    assert 0.1 < float(visible.float().mean()) < 0.9 and 0 < float(((image[..., 3] > 0) & (image[..., 3] < 1)).sum())
    assert float((image[..., :3] - torch.tensor([1.0, 0.0, 1.0])).abs().amax(-1).lt(0.01).float().mean()) > 0.05
    return image, None, torch.tensor([0.0, 1.0, 0.0])


@pytest.mark.parametrize("source", ["Load Image", "Join Image with Alpha", "4-channel VAE"])
@pytest.mark.parametrize("with_model", [False, True])
def test_core_rgba_sources_upscale_and_save_without_fringe(pack, output_dir, tmp_path, monkeypatch,
                                                           load_upscale_model, source, with_model):
    import psd_tools

    if source == "Load Image":
        image, mask, colour = load_image_source(tmp_path, monkeypatch)
    elif source == "Join Image with Alpha":
        image, mask, colour = joined_source()
    else:
        image, mask, colour = vae_source()
    optional = {"upscale_model": load_upscale_model()} if with_model else {}
    if mask is not None:
        optional["mask"] = mask
    out = run_upscale(pack, image, **optional)
    assert out.shape == (image.shape[0], 2 * image.shape[1], 2 * image.shape[2], 4)
    # The test model's 3x3 blur is zero-padded: it darkens the image's own border (the VAE's
    # pattern reaches it), which is no fringe; 2 output pixels are its reach.
    inner = (slice(2, -2), slice(2, -2)) if with_model else (slice(None), slice(None))
    for rgba in out:
        assert fringe(rgba[inner], colour) < TOLERANCE
    save_layers(pack, layered_format="PSD", foreground=out, background=torch.ones_like(out[..., :3]))
    for i in range(out.shape[0]):
        psd = psd_tools.PSDImage.open(output_dir / "layerdiffuse" / f"layers_{i + 1:05}_.psd")
        assert psd.size == (out.shape[2], out.shape[1])
        assert [layer.name for layer in psd] == ["background", "foreground"]
        saved = torch.from_numpy(np.asarray(psd[1].topil(), dtype=np.float32) / 255)
        torch.testing.assert_close(saved[..., 3], out[i, ..., 3], atol=1 / 255, rtol=0)
        assert fringe(saved[inner], colour) <= 1 / 255


# --- core's LAYERS (ComfyUI 0.31+) ------------------------------------------------------------------

@pytest.fixture()
def core_layers(pack):
    from comfy_api.latest import io as comfy_io

    if not hasattr(comfy_io, "Layers"):
        assert UPSCALE_LAYERS not in pack.NODE_CLASS_MAPPINGS
        assert "layers" not in [i.id for i in node(pack, SAVE).GET_SCHEMA().inputs]
        pytest.skip("this ComfyUI has no LAYERS type (0.31+); the LAYERS inputs are absent, as checked")
    from comfy_extras.nodes_compositor import AddLayer, ImageCompositor

    return AddLayer, ImageCompositor


def paper_and_disc(add_layer) -> dict:
    """Core's Add Layer twice: an opaque grey 'paper' at the bottom, the green disc (RGB + MASK)
    above it, placed at (8, 4) on the paper's 48x40 canvas."""
    disc = green_discs(1)
    paper = add_layer.execute(image=torch.full((1, 40, 48, 3), 0.5), name="paper").result[0]
    return add_layer.execute(image=disc[..., :3], mask=1.0 - disc[..., 3], layers=paper, name="disc ✓",
                             x=8, y=4).result[0]


def upscale_layers(pack, layers, **options):
    options = {"upscale_method": "lanczos", "scale_by": 2.0, **options}
    return node(pack, UPSCALE_LAYERS).execute(layers=layers, **options).result[0]


@pytest.mark.parametrize("with_model", [False, True])
def test_core_layers_upscale_and_save_named_in_order_without_fringe(pack, output_dir, core_layers,
                                                                   load_upscale_model, with_model):
    import psd_tools

    add_layer, compositor = core_layers
    document = paper_and_disc(add_layer)
    optional = {"upscale_model": load_upscale_model()} if with_model else {}
    upscaled = upscale_layers(pack, document, **optional)
    assert [(item["name"], item["x"], item["y"]) for item in upscaled["layers"]] == [("paper", 0, 0), ("disc ✓", 16, 8)]
    assert [tuple(item["image"].shape) for item in upscaled["layers"]] == [(1, 80, 96, 4), (1, 64, 64, 4)]
    assert "mask" not in upscaled["layers"][1] and fringe(upscaled["layers"][1]["image"][0]) < TOLERANCE
    # Core's Create Layered Image takes the upscaled stack: the disc over the paper, twice the size.
    composite = compositor.execute(layers=upscaled).result[0]
    assert composite.shape == (1, 80, 96, 3)

    result = save_layers(pack, layers=upscaled)
    assert result.result[0] is upscaled
    folder = output_dir / "layerdiffuse"
    assert sorted(p.name for p in folder.glob("*.png")) == ["layers_00001_01_paper.png", "layers_00001_02_disc _.png"]
    psd = psd_tools.PSDImage.open(folder / "layers_00001_.psd")
    assert psd.size == (96, 80) and [layer.name for layer in psd] == ["paper", "disc ✓"]
    disc = torch.from_numpy(np.asarray(psd[1].topil(), dtype=np.float32) / 255)
    assert disc.shape == (80, 96, 4) and not disc[:8, :, 3].any() and not disc[:, :16, 3].any()
    torch.testing.assert_close(disc[8:72, 16:80, 3], upscaled["layers"][1]["image"][0, ..., 3], atol=1 / 255, rtol=0)
    assert fringe(disc, torch.round(GREEN * 255) / 255) <= 1 / 255
    with zipfile.ZipFile(folder / "layers_00001_.ora") as ora:
        stack = ora.read("stack.xml").decode()
    assert stack.index('name="disc ✓"') < stack.index('name="paper"')  # OpenRaster lists the top first


def test_layers_placement_opacity_and_visibility_reach_the_file(pack, output_dir, core_layers):
    import psd_tools

    add_layer, _ = core_layers
    red = torch.tensor([1.0, 0.0, 0.0]).expand(1, 4, 6, 3).contiguous()
    document = add_layer.execute(image=red, name="small", x=-2, y=1, width=12, height=8, flip_h=True,
                                 opacity=0.5).result[0]
    document["canvas"] = (16, 10)
    document = add_layer.execute(image=torch.rand(2, 10, 16, 3), layers=document, name="pair").result[0]
    document["layers"][1]["visible"] = False
    save_layers(pack, layered_format="PSD", layers=document)
    psd = psd_tools.PSDImage.open(output_dir / "layerdiffuse" / "layers_00001_.psd")
    assert psd.size == (16, 10)
    assert [(layer.name, layer.visible, layer.opacity) for layer in psd] == [
        ("small", True, 128), ("pair 1", False, 255), ("pair 2", False, 255)]
    small = np.asarray(psd[0].topil())
    assert small.shape == (10, 16, 4)
    assert (small[1:9, :10, 3] == 255).all() and not small[0, :, 3].any() and not small[9, :, 3].any()
    assert not small[:, 10:, 3].any()


@pytest.mark.parametrize("change, message", [
    ({"blend_mode": "multiply"}, "blend mode 'multiply'"),
    ({"rotation": 0.3}, "rotated"),
    ({"type": "text"}, "only raster layers"),
])
def test_layers_a_file_cannot_show_are_refused(pack, output_dir, core_layers, change, message):
    errors = pack_module("lib_layerdiffuse.errors")
    document = paper_and_disc(core_layers[0])
    document["layers"][1].update(change)
    with pytest.raises(errors.InputError, match=message):
        save_layers(pack, layers=document)
    assert not output_dir.exists() or not list(output_dir.rglob("*.*"))


def test_layers_with_images_or_empty_are_refused(pack, output_dir, core_layers):
    errors = pack_module("lib_layerdiffuse.errors")
    document = paper_and_disc(core_layers[0])
    with pytest.raises(errors.InputError, match="both layers and foreground"):
        save_layers(pack, layers=document, foreground=layer_images()["foreground"])
    with pytest.raises(errors.InputError, match="no layers"):
        save_layers(pack, layers={"version": 1, "layers": []})
    with pytest.raises(errors.InputError, match="over 16384"):
        upscale_layers(pack, {**document, "layers": [{**document["layers"][0], "image": torch.zeros(1, 2100, 4, 3)}]},
                       scale_by=8.0)
