#!/usr/bin/env python3
"""Memory of the transparent decode, the offset encoder and the RGBA resize, measured against the
estimates in lib_layerdiffuse/batch_memory.py, and a batch decoded through the node with little
memory free.

Every measurement runs in a fresh process: the growth of its peak resident memory (Linux VmHWM,
reset just before the run) over what it held before, with the weights and inputs already there.

    python benchmarks/bench_batch_memory.py calibrate                 # the per-pixel table (CPU)
    COMFYUI_PATH=... python benchmarks/bench_batch_memory.py node --batch 16 --size 1024 --free-gib 9

`calibrate` prints, per run, the measured growth per pixel and the estimate's (which must be a
little above it). `node` runs Layer Diffuse Decode (RGBA) with default settings (8 passes, auto
precision, sub_batch_size 16) in a ComfyUI process on the CPU, on random weights written to a
temporary layer_model folder; `--free-gib F` first starts a process that holds memory until
about F GiB are available (it refuses if that would leave less than F), `--report-free-gib F`
instead makes ComfyUI report F GiB free (nothing held). It prints the free memory ComfyUI saw,
the sub-batches, the peak growth and the time.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30
# (what, side, batch, dtype, passes) for `calibrate`.
CALIBRATION = [
    ("decoder", 256, 1, "float32", 1), ("decoder", 512, 1, "float32", 1), ("decoder", 512, 2, "float32", 1),
    ("decoder", 512, 1, "float32", 8), ("decoder", 1024, 1, "float32", 1),
    ("decoder", 256, 1, "bfloat16", 1), ("decoder", 512, 1, "bfloat16", 1), ("decoder", 512, 2, "bfloat16", 4),
    ("network", 256, 1, "float32", 1), ("network", 512, 1, "float32", 1), ("network", 512, 1, "bfloat16", 1),
    ("encoder", 512, 1, "float32", 1), ("encoder", 1024, 2, "float32", 1),
    ("resize", 512, 2, "float32", 1), ("resize", 1024, 1, "float32", 1),
]


def _rss(field: str = "VmRSS:") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no /proc/self/status: the measurement needs Linux")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _growth(run) -> tuple[int, object]:
    """(peak resident memory during `run()` minus the resident memory before, its result)."""
    gc.collect()
    before = _rss()
    _reset_peak()
    result = run()
    return _rss("VmHWM:") - before, result


# --- calibrate: the library alone ------------------------------------------------------------------

def calibration_worker(what: str, side: int, batch: int, dtype_name: str, passes: int) -> dict:
    sys.path.insert(0, ROOT)
    import torch

    from lib_layerdiffuse import batch_memory
    from lib_layerdiffuse.offset_encoder import LatentTransparencyOffsetEncoder
    from lib_layerdiffuse.rgba_upscale import resize_rgba
    from lib_layerdiffuse.transparent_vae import decode_transparent
    from lib_layerdiffuse.unet1024 import UNet1024
    from lib_layerdiffuse.vae_family import SD

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    if what in ("decoder", "network"):
        model = UNet1024().to(dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)
        for name in UNet1024.FLOAT32_MODULES:
            model.get_submodule(name).float()
        pixel, latent = torch.rand(batch, 3, side, side), torch.randn(batch, 4, side // 8, side // 8)
        if what == "decoder":
            growth, _ = _growth(lambda: decode_transparent(SD, model, pixel, latent, batch, passes=passes))
        else:  # the plain network, as it runs on an accelerator, one pass
            with torch.inference_mode():
                growth, _ = _growth(lambda: model(pixel.contiguous(memory_format=torch.channels_last), latent))
        estimate = batch_memory.decoder_memory(side, side, batch, dtype.itemsize, passes, what == "decoder")
    elif what == "encoder":
        model = LatentTransparencyOffsetEncoder().to(dtype=dtype).eval().requires_grad_(False)
        feed = torch.rand(batch, 4, side, side)
        with torch.no_grad():
            growth, _ = _growth(lambda: model(feed.to(dtype)))
        estimate = batch_memory.encoder_memory(side, side, dtype.itemsize)
    else:  # resize: half the size to `side`, lanczos, image by image as the node does
        rgb, alpha = torch.rand(batch, 3, side // 2, side // 2), torch.rand(batch, 1, side // 2, side // 2)

        def run():
            outs = [resize_rgba(rgb[i:i + 1], alpha[i:i + 1], side, side, "lanczos") for i in range(batch)]
            return torch.cat([torch.cat([c for c, _ in outs]), torch.cat([a for _, a in outs])], dim=1)
        growth, _ = _growth(run)
        estimate = batch_memory.resize_memory(side, side, batch)
    pixels = batch * side * side
    return {"what": what, "side": side, "batch": batch, "dtype": dtype_name, "passes": passes, "growth": growth,
            "measured_per_pixel": growth / pixels, "estimate": estimate.for_images(batch),
            "estimate_per_pixel": estimate.for_images(batch) / pixels}


def calibrate(args) -> None:
    print(f"{'run':<36} {'growth MiB':>11} {'B/pixel':>8} {'estimate MiB':>13} {'B/pixel':>8} {'est/meas':>9}")
    for what, side, batch, dtype, passes in CALIBRATION:
        if args.only and what not in args.only:
            continue
        result = _subprocess(["_calibration", what, str(side), str(batch), dtype, str(passes)])
        label = f"{what} {batch}x{side}² {dtype} {passes}p"
        print(f"{label:<36} {result['growth'] / 2**20:>11.0f} {result['measured_per_pixel']:>8.0f} "
              f"{result['estimate'] / 2**20:>13.0f} {result['estimate_per_pixel']:>8.0f} "
              f"{result['estimate'] / result['growth']:>9.2f}", flush=True)


# --- node: Layer Diffuse Decode (RGBA) in ComfyUI ----------------------------------------------------

def node_worker(folder: str, side: int, batch: int, sub_batch_size: int, passes: str, precision: str,
                report_free: float | None) -> dict:
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import torch
    import comfy.model_management as model_management
    import folder_paths
    import nodes

    assert asyncio.run(nodes.load_custom_node(ROOT)), "ComfyUI did not load the pack"
    def pack(name: str):  # the loader names the pack's modules after its folder's path
        return next(module for module_name, module in list(sys.modules.items())
                    if module_name.endswith("." + name) and str(getattr(module, "__file__", "")).startswith(ROOT))

    transparent_vae, model_store = pack("lib_layerdiffuse.transparent_vae"), pack("nodes.model_store")
    decoders = pack("lib_layerdiffuse.weight_files").TRANSPARENT_DECODERS

    path = os.path.join(folder, decoders["SDXL"].name)
    folder_paths.folder_names_and_paths["layer_model"] = ([folder], {".safetensors"})
    model_store.network(path, pack("lib_layerdiffuse.vae_family").SD.decoder,
                        pack("nodes.vae_pipeline").PRECISIONS[precision])

    sub_batches = []
    decode_augmented = transparent_vae.decode_augmented

    def counted(model, pixel, *rest, **kwargs):
        sub_batches.append(pixel.shape[0])
        return decode_augmented(model, pixel, *rest, **kwargs)

    transparent_vae.decode_augmented = counted
    if report_free is not None:
        model_management.get_free_memory = lambda dev=None, torch_free_too=False: int(report_free * GIB)
    images = torch.rand(batch, side, side, 3)
    samples = {"samples": torch.randn(batch, 4, side // 8, side // 8)}
    free = model_management.get_free_memory(torch.device("cpu"))
    node = nodes.NODE_CLASS_MAPPINGS["LayeredDiffusionDecodeRGBA"]
    start = time.perf_counter()
    growth, result = _growth(lambda: node.execute(samples=samples, images=images, sd_version="SDXL",
                                                  sub_batch_size=sub_batch_size, passes=passes, precision=precision))
    seconds = time.perf_counter() - start
    image = result.result[0] if hasattr(result, "result") else result[0]
    assert image.shape == (batch, side, side, 4) and bool(torch.isfinite(image).all())
    return {"free": free, "sub_batches": sub_batches, "growth": growth, "peak": _rss("VmHWM:"), "seconds": seconds}


def _hold(free_gib: float) -> subprocess.Popen:
    """A process that holds memory until about `free_gib` GiB are available (until it is killed)."""
    import psutil

    hold = psutil.virtual_memory().available - int(free_gib * GIB)
    if hold < 0:
        raise SystemExit(f"only {psutil.virtual_memory().available / GIB:.1f} GiB are available, less than "
                         f"--free-gib {free_gib}")
    code = ("import sys, numpy; a = numpy.empty(int(sys.argv[1]), numpy.uint8); a.fill(1); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(hold)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    holder.stdout.readline()
    print(f"holding {hold / GIB:.1f} GiB in process {holder.pid}; "
          f"{psutil.virtual_memory().available / GIB:.1f} GiB available", flush=True)
    return holder


def _random_decoder_file(folder: str) -> None:
    """Random weights under the SDXL decoder's file name (written here: memory the measured process
    freed would hide part of its growth)."""
    sys.path.insert(0, ROOT)
    import torch
    from safetensors.torch import save_file

    from lib_layerdiffuse.unet1024 import UNet1024
    from lib_layerdiffuse.weight_files import TRANSPARENT_DECODERS

    torch.manual_seed(0)
    save_file(UNet1024().state_dict(), os.path.join(folder, TRANSPARENT_DECODERS["SDXL"].name))


def node(args) -> None:
    folder = tempfile.mkdtemp(prefix="layer_model_")
    _random_decoder_file(folder)
    holder = _hold(args.free_gib) if args.free_gib is not None else None
    try:
        result = _subprocess(["_node", folder, str(args.size), str(args.batch), str(args.sub_batch_size), args.passes,
                              args.precision, "" if args.report_free_gib is None else str(args.report_free_gib)])
    finally:
        shutil.rmtree(folder)
        if holder is not None:
            holder.kill()
            holder.wait()
    print(f"{args.batch} x {args.size}² passes={args.passes} precision={args.precision} "
          f"sub_batch_size={args.sub_batch_size}: ComfyUI saw {result['free'] / GIB:.2f} GiB free; "
          f"sub-batches {result['sub_batches']}; peak growth {result['growth'] / GIB:.2f} GiB "
          f"(process peak {result['peak'] / GIB:.2f} GiB); {result['seconds']:.0f} s")
    if args.json:
        print(json.dumps(result))


def _subprocess(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the measurement failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["_calibration"]:
        what, side, batch, dtype, passes = sys.argv[2:7]
        print(json.dumps(calibration_worker(what, int(side), int(batch), dtype, int(passes))))
        return
    if sys.argv[1:2] == ["_node"]:
        folder, side, batch, sub_batch_size, passes, precision, report = sys.argv[2:9]
        print(json.dumps(node_worker(folder, int(side), int(batch), int(sub_batch_size), passes, precision,
                                     float(report) if report else None)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cal = commands.add_parser("calibrate", help="measured growth per pixel against the estimates")
    cal.add_argument("--only", nargs="*", choices=["decoder", "network", "encoder", "resize"])
    run = commands.add_parser("node", help="Layer Diffuse Decode (RGBA) in ComfyUI with little memory free")
    run.add_argument("--size", type=int, default=1024)
    run.add_argument("--batch", type=int, default=16)
    run.add_argument("--sub-batch-size", type=int, default=16)
    run.add_argument("--passes", default="8", choices=["8", "4", "1"])
    run.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    free = run.add_mutually_exclusive_group()
    free.add_argument("--free-gib", type=float, help="hold memory in another process until this much is available")
    free.add_argument("--report-free-gib", type=float, help="make ComfyUI report this much free (nothing held)")
    run.add_argument("--json", action="store_true", help="also print the result as JSON")
    args = parser.parse_args()
    (calibrate if args.command == "calibrate" else node)(args)


if __name__ == "__main__":
    main()
