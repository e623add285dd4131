"""The transparent VAE nodes inside a real ComfyUI process: loading, compatibility, execution."""
from __future__ import annotations

import re
import sys

import pytest
import torch
from safetensors import safe_open

from support import fake_hub
from support.images import rgba_disc
from support.pack import pack_module, run_node
from support.synth import synthetic_file
from support.workflows import compat_names, load_compat

DECODE_NODES = ["LayeredDiffusionDecode", "LayeredDiffusionDecodeRGBA", "LayeredDiffusionDecodeSplit"]
OUR_NODES = DECODE_NODES + ["LayeredDiffusionEncode", "LayeredDiffusionCheckerboard"]


@pytest.fixture()
def layer_model_dir(pack, tmp_path, monkeypatch):
    """A layer_model folder holding synthetic SD1.5/SDXL transparent VAE files (and nothing else)."""
    import folder_paths

    for stem in ("vae_transparent_decoder", "vae_transparent_encoder",
                 "layer_sd15_vae_transparent_decoder", "layer_sd15_vae_transparent_encoder"):
        source = synthetic_file(stem)
        (tmp_path / source.name).symlink_to(source)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


@pytest.fixture(scope="module")
def sd15_vae(pack):
    """The VAE of the synthetic SD1.5 checkpoint, as ComfyUI builds it."""
    import comfy.sd

    prefix = "first_stage_model."
    with safe_open(str(synthetic_file("sd15_checkpoint")), framework="pt") as f:
        state = {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}
    return comfy.sd.VAE(sd=state)


def node(pack, node_id):
    return pack.NODE_CLASS_MAPPINGS[node_id]


# --- registration ---------------------------------------------------------------------------------

@pytest.mark.registration
def test_pack_registers_through_comfyui_loader(pack):
    for node_id in OUR_NODES:
        assert node_id in pack.NODE_CLASS_MAPPINGS, node_id
        schema = node(pack, node_id).define_schema()
        assert schema.category.startswith("layer_diffuse")
        assert all(i.tooltip for i in schema.inputs), f"{node_id} has inputs without tooltips"
    package = pack_module("nodes").__name__.rsplit(".", 1)[0]
    assert not hasattr(sys.modules[package], "NODE_CLASS_MAPPINGS")


def test_layer_model_folder_keeps_configured_paths(pack, monkeypatch, tmp_path):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model", ([str(tmp_path)], set()))
    pack_module("nodes.model_store").register_folder()
    paths, extensions = folder_paths.folder_names_and_paths["layer_model"]
    assert paths[0] == str(tmp_path) and paths[1].endswith("layer_model") and extensions == {".safetensors"}


def _widget_inputs(node_class) -> list[tuple[str, dict]]:
    """(name, options) of the inputs the frontend shows as widgets, in order."""
    spec = node_class.INPUT_TYPES()
    widgets = []
    for group in ("required", "optional"):
        for name, (kind, options) in spec.get(group, {}).items():
            if kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") or isinstance(kind, list):
                widgets.append((name, {**options, "kind": kind}))
    return widgets


@pytest.mark.registration
@pytest.mark.parametrize("workflow", compat_names())
def test_peer_workflows_fit_our_decode_nodes(pack, workflow):
    graph = load_compat(workflow)
    for item in graph["nodes"]:
        if item["type"] not in DECODE_NODES:
            continue
        node_class = node(pack, item["type"])
        widgets = _widget_inputs(node_class)
        # Our extra widgets come after the peer's and keep their defaults when it has no value.
        assert len(widgets) >= len(item["widgets_values"])
        assert all("default" in options for _, options in widgets[len(item["widgets_values"]):])
        for (name, options), value in zip(widgets, item["widgets_values"]):
            if options["kind"] == "COMBO":
                assert value in options["options"], (name, value)
            else:
                assert options["min"] <= value <= options["max"], (name, value)
        ours = node_class.INPUT_TYPES()["required"]
        for slot in item["inputs"]:
            assert ours[slot["name"]][0] == slot["type"]
        assert [o["type"] for o in item["outputs"]] == list(node_class.RETURN_TYPES)


# --- execution in-process -------------------------------------------------------------------------

def test_decode_rgba_keeps_odd_sizes(pack, layer_model_dir):
    images = torch.rand(2, 120, 200, 3)
    latent = {"samples": torch.randn(2, 4, 15, 25)}
    (rgba,) = run_node(pack, "LayeredDiffusionDecodeRGBA", samples=latent, images=images, sd_version="SDXL", sub_batch_size=1)
    assert rgba.shape == (2, 120, 200, 4) and rgba.dtype == torch.float32
    image, mask = run_node(pack, "LayeredDiffusionDecode", samples=latent, images=images, sd_version="SDXL", sub_batch_size=2)
    # Sub-batches of 1 and 2 differ by float rounding only.
    torch.testing.assert_close(image, rgba[..., :3], atol=1e-4, rtol=0)
    torch.testing.assert_close(mask, rgba[..., 3], atol=1e-4, rtol=0)

    import comfy.model_management

    loaded = [m.model for m in comfy.model_management.current_loaded_models]
    assert any(type(getattr(m, "model", None)).__name__ == "UNet1024" for m in loaded), "not managed by ComfyUI"


def test_fast_modes_run_and_stay_close(pack, layer_model_dir):
    images = torch.rand(1, 64, 64, 3)
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    (reference,) = run_node(pack, "LayeredDiffusionDecodeRGBA", samples=latent, images=images, sd_version="SD15",
                            sub_batch_size=1, passes="8", precision="float32")
    (half,) = run_node(pack, "LayeredDiffusionDecodeRGBA", samples=latent, images=images, sd_version="SD15",
                       sub_batch_size=1, passes="8", precision="bfloat16")
    assert half.dtype == torch.float32 and 0 < (half - reference).abs().max() < 5e-2
    (four,) = run_node(pack, "LayeredDiffusionDecodeRGBA", samples=latent, images=images, sd_version="SD15",
                       sub_batch_size=1, passes="4", precision="auto")
    assert four.shape == reference.shape and not torch.equal(four, reference)


def test_decode_errors_say_what_to_connect(pack, layer_model_dir):
    with pytest.raises(pack_module("lib_layerdiffuse.errors").InputError, match="batch mismatch: 2 images but 1 latents"):
        run_node(pack, "LayeredDiffusionDecode", samples={"samples": torch.randn(1, 4, 8, 8)},
                 images=torch.rand(2, 64, 64, 3), sd_version="SD15", sub_batch_size=4)
    with pytest.raises(pack_module("lib_layerdiffuse.errors").InputError, match="size mismatch"):
        run_node(pack, "LayeredDiffusionDecodeRGBA", samples={"samples": torch.randn(1, 4, 8, 8)},
                 images=torch.rand(1, 128, 64, 3), sd_version="SD15", sub_batch_size=4)
    with pytest.raises(pack_module("lib_layerdiffuse.errors").InputError, match="not a multiple of frames=2"):
        run_node(pack, "LayeredDiffusionDecodeSplit", samples={"samples": torch.randn(3, 4, 8, 8)},
                 images=torch.rand(3, 64, 64, 3), frames=2, sd_version="SD15", sub_batch_size=4)


def test_decode_split_decodes_every_nth_image(pack, layer_model_dir):
    images = torch.rand(6, 64, 64, 3)
    latent = {"samples": torch.randn(6, 4, 8, 8)}
    first, second, third = run_node(pack, "LayeredDiffusionDecodeSplit", samples=latent, images=images, frames=3,
                                    sd_version="SD15", sub_batch_size=16)
    (expected,) = run_node(pack, "LayeredDiffusionDecodeRGBA", samples={"samples": latent["samples"][::3]},
                           images=images[::3], sd_version="SD15", sub_batch_size=16)
    torch.testing.assert_close(first, expected)
    assert torch.equal(second, images[1::3]) and torch.equal(third, images[2::3])
    outputs = run_node(pack, "LayeredDiffusionDecodeSplit", samples=latent, images=images, frames=2,
                       sd_version="SD15", sub_batch_size=16)
    assert outputs[0].shape == (3, 64, 64, 4) and outputs[2] is None


def test_missing_weights_offline_name_file_url_and_folder(pack, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model", ([str(tmp_path)], {".safetensors"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weight_files = pack_module("lib_layerdiffuse.weight_files")
    with pytest.raises(weight_files.WeightFileError) as error:
        run_node(pack, "LayeredDiffusionDecode", samples={"samples": torch.randn(1, 4, 8, 8)},
                 images=torch.rand(1, 64, 64, 3), sd_version="SD15", sub_batch_size=1)
    text = str(error.value)
    assert "layer_sd15_vae_transparent_decoder.safetensors" in text and str(tmp_path) in text
    assert "https://huggingface.co/LayerDiffusion/layerdiffusion-v1/resolve/main/" in text


def test_validation_names_an_unknown_sd_version_and_a_missing_file(pack, tmp_path, monkeypatch):
    """validate_inputs: an unknown sd_version is named with the valid ones, a missing file offline
    says what to download, a value from another node (None) is left to execution."""
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model", ([str(tmp_path)], {".safetensors"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nodes = pack.NODE_CLASS_MAPPINGS
    assert nodes["LayeredDiffusionEncode"].validate_inputs(sd_version="SD3") == \
        "sd_version must be one of SD15, SDXL, not 'SD3'"
    problem = nodes["LayeredDiffusionDecode"].validate_inputs(sd_version="SD15")
    assert "layer_sd15_vae_transparent_decoder.safetensors" in problem and str(tmp_path) in problem
    assert nodes["LayeredDiffusionDecodeSplit"].validate_inputs(sd_version=None) is True


def test_progress_bar_advances_over_the_decode_passes(pack, layer_model_dir, monkeypatch):
    """One step per decoder pass (8 passes x 2 sub-batches). What reaches the UI is the host's
    business: 0.33 throttles the hook between the first and the last value, 0.8 sends them all."""
    import comfy.utils

    steps, shown = [], []
    original_update = comfy.utils.ProgressBar.update

    def update(bar, value):
        steps.append((value, bar.total))
        return original_update(bar, value)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update", update)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: shown.append((value, total)))
    run_node(pack, "LayeredDiffusionDecode", samples={"samples": torch.randn(3, 4, 8, 8)},
             images=torch.rand(3, 64, 64, 3), sd_version="SD15", sub_batch_size=2)
    assert steps == [(1, 16)] * 16
    values = [value for value, _ in shown]
    assert shown[0] == (1, 16) and shown[-1] == (16, 16) and values == sorted(set(values))


def test_missing_weight_file_is_downloaded_into_layer_model(pack, tmp_path, monkeypatch):
    """The glue's download path end to end, from a fake Hub on 127.0.0.1 (support.fake_hub), with
    the bytes reported to ComfyUI's progress bar."""
    import comfy.utils
    import folder_paths
    import huggingface_hub.constants

    folder = tmp_path / "layer_model"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "layer_model", ([str(folder)], {".safetensors"}))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    updates = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: updates.append((value, total)))
    weight_files = pack_module("lib_layerdiffuse.weight_files")
    published = weight_files.WeightFile("ok.safetensors", "SDXL", "transparent encoder", fake_hub.REPO)
    with fake_hub.serving() as hub:
        # huggingface_hub reads HF_ENDPOINT when imported: point this process's copy at the fake Hub.
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        path = pack_module("nodes.model_store").ensure_weight_file(published)
    assert path == str(folder / "ok.safetensors") and open(path, "rb").read() == fake_hub.PAYLOAD
    assert updates[-1] == (len(fake_hub.PAYLOAD), len(fake_hub.PAYLOAD))
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == ["ok.safetensors"]


def test_encode_is_posterior_mean_plus_std_times_offset(pack, layer_model_dir, sd15_vae):
    image = rgba_disc()
    (latent,) = run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, image=image[..., :3],
                         mask=1 - image[..., 3], sd_version="SD15")
    z = latent["samples"]
    assert z.shape == (1, 4, 8, 12)
    # The same image given as RGBA without a mask is the same latent.
    (again,) = run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, image=image, sd_version="SD15")
    torch.testing.assert_close(again["samples"], z)

    pipeline = pack_module("nodes.vae_pipeline")
    lib = pack_module("lib_layerdiffuse.transparent_vae")
    rgb, alpha = image[..., :3].movedim(-1, 1), image[..., 3:].movedim(-1, 1)
    grey = 127 / 255  # the reference flattens on 8-bit grey
    mean, std = pipeline.vae_posterior(sd15_vae, grey + (rgb - grey) * alpha)
    torch.testing.assert_close(mean, sd15_vae.encode(grey + (image[..., :3] - grey) * image[..., 3:]), atol=1e-4, rtol=1e-4)
    store = pack_module("nodes.model_store")
    encoder_file = store.ensure_weight_file(pack_module("lib_layerdiffuse.weight_files").TRANSPARENT_ENCODERS["SD15"])
    encoder = store.network(encoder_file, lib.LatentTransparencyOffsetEncoder).model
    offset = lib.transparency_offset(pack_module("lib_layerdiffuse.vae_family").SD, encoder, rgb, alpha)
    assert offset.abs().max() > 0
    torch.testing.assert_close(z, mean + std * offset, atol=1e-5, rtol=1e-5)


def test_encode_decode_round_trip(pack, layer_model_dir, sd15_vae):
    image = rgba_disc(64, 64)
    (latent,) = run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, image=image, sd_version="SD15")
    decoded = sd15_vae.decode(latent["samples"])
    (rgba,) = run_node(pack, "LayeredDiffusionDecodeRGBA", samples=latent, images=decoded, sd_version="SD15",
                       sub_batch_size=4)
    assert rgba.shape == (1, 64, 64, 4) and torch.isfinite(rgba).all()


def test_encode_crops_like_vae_encode_and_checks_masks(pack, layer_model_dir, sd15_vae):
    (latent,) = run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, image=torch.rand(1, 70, 61, 3), sd_version="SD15")
    assert latent["samples"].shape == (1, 4, 8, 7)
    with pytest.raises(pack_module("lib_layerdiffuse.errors").InputError, match="3 masks for 2 images"):
        run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, image=torch.rand(2, 64, 64, 3),
                 mask=torch.zeros(3, 64, 64), sd_version="SD15")


def test_checkerboard_preview(pack):
    image = torch.zeros(1, 32, 32, 4)
    (preview,) = run_node(pack, "LayeredDiffusionCheckerboard", image=image, square=16)
    assert preview.shape == (1, 32, 32, 3)
    assert preview[0, 0, 0, 0] != preview[0, 0, 16, 0]
    opaque = torch.ones(1, 32, 32, 4)
    assert torch.equal(run_node(pack, "LayeredDiffusionCheckerboard", image=opaque, square=16)[0], opaque[..., :3])


# --- bad inputs -----------------------------------------------------------------------------------

NAN = float("nan")


def _nan_at(shape, count=3):
    x = torch.rand(shape)
    x.view(-1)[:count] = NAN
    return x


def _decode(node_id, samples, images, **extra):
    return dict(samples={"samples": samples}, images=images, sd_version="SD15", sub_batch_size=1,
                **({"frames": 2} if node_id.endswith("Split") else {}), **extra)


@pytest.mark.parametrize("node_id", DECODE_NODES)
@pytest.mark.parametrize("samples,images,message", [
    (_nan_at((2, 4, 8, 8)), torch.rand(2, 64, 64, 3),
     r"samples holds 3 NaN and 0 infinite values \(of \d+\); the sampler diverged"),
    (torch.randn(2, 4, 8, 8), _nan_at((2, 64, 64, 3)), r"images \(the VAE-decoded latent\) holds 3 NaN.*--fp32-vae"),
    (torch.randn(0, 4, 8, 8), torch.rand(0, 64, 64, 3), "samples is an empty batch"),
    (torch.randn(2, 16, 8, 8), torch.rand(2, 64, 64, 3),
     "the latent has 16 channels but the SD1.5/SDXL transparent decoder takes 4.*Layer Diffuse Flux Decode"),
    (torch.randn(2, 4, 8, 8), torch.rand(2, 64, 64, 4), "images has 4 channels.*not an RGBA image"),
    (torch.randn(2, 4, 1, 1), torch.rand(2, 7, 7, 3), "size mismatch: the images are 7x7 but the latent is 1x1"),
])
def test_bad_decode_inputs_name_the_node_and_the_cure(pack, layer_model_dir, node_id, samples, images, message):
    title = node(pack, node_id).define_schema().display_name
    with pytest.raises(pack_module("lib_layerdiffuse.errors").InputError, match=f"^{re.escape(title)}: {message}"):
        run_node(pack, node_id, **_decode(node_id, samples, images))


def test_smallest_decode_works(pack, layer_model_dir):
    (rgba,) = run_node(pack, "LayeredDiffusionDecodeRGBA", **_decode("", torch.randn(1, 4, 1, 1), torch.rand(1, 8, 8, 3)))
    assert rgba.shape == (1, 8, 8, 4) and torch.isfinite(rgba).all()


def test_a_decoder_that_overflows_is_an_error(pack, layer_model_dir, monkeypatch):
    """A network that overflows (as one in float16 can) gives inf/NaN, never a clipped image."""
    lib = pack_module("lib_layerdiffuse.transparent_vae")
    monkeypatch.setattr(lib.CpuExecutor, "__call__", lambda self, p, z: torch.full_like(p[:, :1].expand(-1, 4, -1, -1), float("inf")))
    with pytest.raises(pack_module("lib_layerdiffuse.finite").NonFiniteError,
                       match="the transparent decoder: its output holds 0 NaN and 16384 infinite.*precision"):
        run_node(pack, "LayeredDiffusionDecodeRGBA", **_decode("", torch.randn(1, 4, 8, 8), torch.rand(1, 64, 64, 3)))


@pytest.mark.parametrize("inputs,message", [
    ({"image": _nan_at((1, 64, 64, 4))}, r"Layer Diffuse Encode: image holds 3 NaN and 0 infinite values"),
    ({"image": torch.rand(1, 64, 64, 3), "mask": _nan_at((1, 64, 64))}, "the mask of image holds 3 NaN"),
    ({"image": torch.rand(0, 64, 64, 3)}, r"Layer Diffuse Encode: image is empty \(shape \[0, 64, 64, 3\]\)"),
    ({"image": torch.rand(1, 7, 7, 3)}, "the image is 7x7; it must be at least 8x8: upscale it first"),
    ({"image": torch.rand(1, 1, 1, 3)}, "the image is 1x1; it must be at least 8x8"),
    ({"image": torch.rand(1, 64, 64, 5)}, r"image has shape \[1, 64, 64, 5\].*C = 1 to 4"),
])
def test_bad_encode_inputs_name_the_node_and_the_cure(pack, layer_model_dir, sd15_vae, inputs, message):
    with pytest.raises(pack_module("lib_layerdiffuse.errors").InputError, match=message):
        run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, sd_version="SD15", **inputs)


def test_encode_takes_grey_masks_of_another_size_and_clamps_alpha(pack, layer_model_dir, sd15_vae):
    image = rgba_disc(64, 64)
    (reference,) = run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, image=image, sd_version="SD15")
    # grey + alpha (2 channels) is the grey RGBA image
    grey = image[..., :1].expand(-1, -1, -1, 3)
    (two,) = run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, sd_version="SD15",
                      image=torch.cat([image[..., :1], image[..., 3:]], dim=-1))
    (expected,) = run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, sd_version="SD15",
                           image=torch.cat([grey, image[..., 3:]], dim=-1))
    torch.testing.assert_close(two["samples"], expected["samples"], atol=1e-4, rtol=0)  # memory layouts differ
    (one,) = run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, sd_version="SD15", image=image[..., :1])
    (opaque,) = run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, sd_version="SD15", image=grey)
    torch.testing.assert_close(one["samples"], opaque["samples"], atol=1e-4, rtol=0)
    # alpha past [0,1] (resampling overshoot) is clamped: the same latent as the clamped image
    overshoot = image.clone()
    overshoot[..., 3] = overshoot[..., 3] * 1.2 - 0.1
    clamped = overshoot.clone()
    clamped[..., 3] = clamped[..., 3].clamp(0, 1)
    (a,) = run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, sd_version="SD15", image=overshoot)
    (b,) = run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, sd_version="SD15", image=clamped)
    assert torch.equal(a["samples"], b["samples"]) and not torch.equal(a["samples"], reference["samples"])
    # a mask of another size is resized to the image
    (small_mask,) = run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, sd_version="SD15", image=image[..., :3],
                             mask=torch.zeros(1, 16, 16))
    (full_mask,) = run_node(pack, "LayeredDiffusionEncode", vae=sd15_vae, sd_version="SD15", image=image[..., :3],
                            mask=torch.zeros(1, 64, 64))
    assert torch.equal(small_mask["samples"], full_mask["samples"])


def test_checkerboard_bad_and_small_inputs(pack):
    errors = pack_module("lib_layerdiffuse.errors")
    with pytest.raises(errors.InputError, match="Layer Diffuse Checkerboard Preview: image holds 3 NaN"):
        run_node(pack, "LayeredDiffusionCheckerboard", image=_nan_at((1, 8, 8, 4)), square=4)
    with pytest.raises(errors.InputError, match="Layer Diffuse Checkerboard Preview: image is empty"):
        run_node(pack, "LayeredDiffusionCheckerboard", image=torch.rand(0, 8, 8, 4), square=4)
    (tiny,) = run_node(pack, "LayeredDiffusionCheckerboard", image=torch.rand(1, 1, 1, 4), square=16)
    assert tiny.shape == (1, 1, 1, 3)
    grey_alpha = torch.rand(1, 7, 7, 2)
    (preview,) = run_node(pack, "LayeredDiffusionCheckerboard", image=grey_alpha, square=2)
    (expected,) = run_node(pack, "LayeredDiffusionCheckerboard",
                           image=torch.cat([grey_alpha[..., :1].expand(-1, -1, -1, 3), grey_alpha[..., 1:]], -1), square=2)
    assert preview.shape == (1, 7, 7, 3) and torch.equal(preview, expected)
    (grey,) = run_node(pack, "LayeredDiffusionCheckerboard", image=grey_alpha[..., :1], square=2)
    assert torch.equal(grey, grey_alpha[..., :1].expand(-1, -1, -1, 3))


@pytest.mark.parametrize("node_id,inputs,message", [
    ("LayeredDiffusionUpscaleRGBA", {"image": _nan_at((1, 8, 8, 4))},
     "Layer Diffuse Upscale \\(RGBA\\): image holds 3 NaN"),
    ("LayeredDiffusionUpscaleRGBA", {"image": torch.rand(1, 8, 8, 3), "mask": _nan_at((1, 8, 8))},
     "Layer Diffuse Upscale \\(RGBA\\): the mask of image holds 3 NaN"),
    ("LayeredDiffusionUpscaleRGBA", {"image": torch.rand(0, 8, 8, 4)}, "image is empty"),
    ("LayeredDiffusionSaveLayers", {"foreground": torch.rand(1, 8, 8, 4), "background": _nan_at((1, 8, 8, 3))},
     "Layer Diffuse Save Layers: background holds 3 NaN"),
    ("LayeredDiffusionSaveLayers", {"foreground": torch.rand(1, 8, 8, 3), "foreground_mask": _nan_at((1, 8, 8))},
     "Layer Diffuse Save Layers: the mask of foreground holds 3 NaN"),
])
def test_rgba_nodes_refuse_non_finite_inputs(pack, tmp_path, node_id, inputs, message):
    settings = ({"upscale_method": "bilinear", "scale_by": 2.0, "width": 0, "height": 0, "crop": "disabled"}
                if "Upscale" in node_id else {"filename_prefix": str(tmp_path / "x"), "layered_format": "PSD"})
    with pytest.raises(pack_module("lib_layerdiffuse.errors").InputError, match=message):
        run_node(pack, node_id, **inputs, **settings)
    assert not list(tmp_path.iterdir())


def test_upscale_takes_tiny_and_grey_images(pack):
    settings = {"upscale_method": "bilinear", "scale_by": 2.0, "width": 0, "height": 0, "crop": "disabled"}
    for image in (torch.rand(1, 1, 1, 4), torch.rand(1, 7, 7, 2), torch.rand(1, 7, 7, 1)):
        out, alpha = run_node(pack, "LayeredDiffusionUpscaleRGBA", image=image, **settings)
        assert out.shape == (1, 2 * image.shape[1], 2 * image.shape[2], 4) and torch.isfinite(out).all()
