#!/usr/bin/env python3
"""Benchmark of the transparent decode (8-pass augmented) and the offset encoder.

Compares the pack's implementation ("ours": `decode_transparent`, which runs the decoder through
`unet1024_cpu.CpuExecutor` on the CPU and the plain `unet1024.UNet1024` elsewhere) with a
straightforward baseline of the same network written here (functional torch on the state dict,
NCHW float32, eight sequential passes, median), on the same weights and inputs. Each measurement runs in its own subprocess so that its peak memory is
its own. Prints one table: median time, speedup over the baseline, peak memory, max |difference|.

    python benchmarks/bench_transparent_vae.py                      # 512 and 1024, CPU float32
    python benchmarks/bench_transparent_vae.py --sizes 512 --precision bfloat16 --passes 4
    python benchmarks/bench_transparent_vae.py --device cuda            # float16, as the nodes' "auto"

--precision is the decode nodes' setting: auto (float16 on CUDA, float32 on the CPU), float32,
bfloat16 or float16 (the network in that dtype, its input convolutions in float32).

Weights are random (seeded): speed does not depend on their values. The workers inherit the
environment, so `THP_MEM_ALLOC_ENABLE=1 python benchmarks/...` times both sides with torch's large
CPU tensors on transparent huge pages (the header says whether it is set).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib_layerdiffuse.offset_encoder import LatentTransparencyOffsetEncoder  # noqa: E402
from lib_layerdiffuse.transparent_vae import decode_transparent  # noqa: E402
from lib_layerdiffuse.unet1024 import UNet1024  # noqa: E402
from lib_layerdiffuse.vae_family import SD  # noqa: E402
from lib_layerdiffuse.weight_files import build_model  # noqa: E402


# --- the baseline: the same network, written plainly ----------------------------------------------

def _baseline_decoder(sd: dict, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    def conv(x, name, stride=1):
        w = sd[name + ".weight"]
        return F.conv2d(x, w, sd[name + ".bias"], stride, w.shape[-1] // 2)

    def norm(x, name):
        return F.group_norm(x, 4, sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    def resnet(x, name):
        h = conv(F.silu(norm(x, name + ".norm1")), name + ".conv1")
        h = conv(F.silu(norm(h, name + ".norm2")), name + ".conv2")
        shortcut = conv(x, name + ".conv_shortcut") if name + ".conv_shortcut.weight" in sd else x
        return shortcut + h

    def attention(x, name):
        b, c, h, w = x.shape
        t = norm(x, name + ".group_norm").view(b, c, h * w).transpose(1, 2)
        q, k, v = (F.linear(t, sd[f"{name}.{p}.weight"], sd[f"{name}.{p}.bias"]).view(b, -1, c // 8, 8).transpose(1, 2)
                   for p in ("to_q", "to_k", "to_v"))
        a = F.scaled_dot_product_attention(q, k, v)  # what the reference (diffusers) uses
        a = F.linear(a.transpose(1, 2).reshape(b, h * w, c), sd[name + ".to_out.0.weight"], sd[name + ".to_out.0.bias"])
        return x + a.transpose(1, 2).reshape(b, c, h, w)

    def has(prefix):
        return any(k.startswith(prefix) for k in sd)

    x = conv(pixel, "conv_in")
    skips = [x]
    for i in range(7):
        if i == 3:
            x = x + conv(latent, "latent_conv_in")
        for j in range(2):
            x = resnet(x, f"down_blocks.{i}.resnets.{j}")
            if has(f"down_blocks.{i}.attentions.{j}."):
                x = attention(x, f"down_blocks.{i}.attentions.{j}")
            skips.append(x)
        if has(f"down_blocks.{i}.downsamplers."):
            x = conv(x, f"down_blocks.{i}.downsamplers.0.conv", stride=2)
            skips.append(x)
    x = resnet(x, "mid_block.resnets.0")
    x = attention(x, "mid_block.attentions.0")
    x = resnet(x, "mid_block.resnets.1")
    for i in range(7):
        for j in range(3):
            x = resnet(torch.cat([x, skips.pop()], 1), f"up_blocks.{i}.resnets.{j}")
            if has(f"up_blocks.{i}.attentions.{j}."):
                x = attention(x, f"up_blocks.{i}.attentions.{j}")
        if has(f"up_blocks.{i}.upsamplers."):
            x = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), f"up_blocks.{i}.upsamplers.0.conv")
    return conv(F.silu(norm(x, "conv_norm_out")), "conv_out")


def baseline_decode(sd: dict, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    passes = []
    for flip in (False, True):
        for k in range(4):
            p, z = (torch.rot90(torch.flip(t, (3,)) if flip else t, k, (2, 3)) for t in (pixel, latent))
            y = torch.rot90(_baseline_decoder(sd, p, z).clip(0, 1), -k, (2, 3))
            passes.append(torch.flip(y, (3,)) if flip else y)
    return SD.to_rgba(torch.stack(passes).median(dim=0).values)  # the file's A,R,G,B as ours: R,G,B,A


def reference_decoder(sd: dict) -> torch.nn.Module:
    """The decoder as the existing LayerDiffuse packs run it: diffusers' UNet blocks in a module
    tree whose names are the official file's. Needs `diffusers` (not a dependency of the pack:
    `pip install --target DIR diffusers` and put DIR on PYTHONPATH for this comparison only)."""
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block

    from lib_layerdiffuse.unet1024 import BLOCK_CHANNELS as ch

    common = dict(temb_channels=None, resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=4, attention_head_dim=8,
                  resnet_time_scale_shift="default", dropout=0.0)
    rev = list(reversed(ch))

    class Reference(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = torch.nn.Conv2d(3, ch[0], 3, padding=1)
            self.latent_conv_in = torch.nn.Conv2d(4, ch[2], 1)
            self.down_blocks = torch.nn.ModuleList(
                get_down_block("AttnDownBlock2D" if i >= 4 else "DownBlock2D", num_layers=2, in_channels=ch[max(i - 1, 0)],
                               out_channels=ch[i], add_downsample=i < 6, downsample_padding=1, downsample_type="conv",
                               **common) for i in range(7))
            self.mid_block = UNetMidBlock2D(in_channels=ch[-1], output_scale_factor=1, attn_groups=None,
                                            add_attention=True, **common)
            self.up_blocks = torch.nn.ModuleList(
                get_up_block("AttnUpBlock2D" if i < 3 else "UpBlock2D", num_layers=3, in_channels=rev[min(i + 1, 6)],
                             out_channels=rev[i], prev_output_channel=rev[max(i - 1, 0)], add_upsample=i < 6,
                             resolution_idx=i, upsample_type="conv", **common) for i in range(7))
            self.conv_norm_out = torch.nn.GroupNorm(4, ch[0], eps=1e-5)
            self.conv_out = torch.nn.Conv2d(ch[0], 4, 3, padding=1)

        def forward(self, pixel, latent):
            injected = self.latent_conv_in(latent)
            x = self.conv_in(pixel)
            skips = (x,)
            for i, block in enumerate(self.down_blocks):
                if i == 3:
                    x = x + injected
                x, res = block(hidden_states=x, temb=None)
                skips += res
            x = self.mid_block(x, None)
            for block in self.up_blocks:
                n = len(block.resnets)
                x, skips = block(x, skips[-n:], None), skips[:-n]
            return self.conv_out(F.silu(self.conv_norm_out(x)))

    model = Reference()
    model.load_state_dict(sd, strict=True)
    return model.eval()


def reference_decode(model: torch.nn.Module, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The existing packs' augmented decode: cloned, flipped and rotated (strided) inputs."""
    passes = []
    for flip in (False, True):
        for k in range(4):
            p, z = pixel.clone(), latent.clone()
            if flip:
                p, z = torch.flip(p, dims=(3,)), torch.flip(z, dims=(3,))
            y = torch.rot90(model(torch.rot90(p, k, (2, 3)), torch.rot90(z, k, (2, 3))).clip(0, 1), -k, (2, 3))
            passes.append(torch.flip(y, dims=(3,)) if flip else y)
    return SD.to_rgba(torch.stack(passes).median(dim=0).values)  # the file's A,R,G,B as ours: R,G,B,A


def baseline_encode(sd: dict, feed: torch.Tensor) -> torch.Tensor:
    x = feed
    for i in range(0, 17, 2):
        w = sd[f"blocks.{i}.weight"]
        x = F.conv2d(x, w, sd[f"blocks.{i}.bias"], 2 if i in (4, 8, 12) else 1, 1)
        if i < 16:
            x = F.silu(x)
    return x


# --- one measurement (in a subprocess) -----------------------------------------------------------

def _weights(factory, seed: int) -> dict:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in factory().state_dict().items()}


def _inputs(size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(batch, 3, size, size, generator=g), torch.randn(batch, 4, size // 8, size // 8, generator=g),
            torch.rand(batch, 4, size, size, generator=g))


def _reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS counter, so the peak covers the timed runs only
    (weights and inputs stay resident and are counted)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


PRECISIONS = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def measure(args) -> dict:
    device = args.device
    on_gpu = device.startswith("cuda")
    dtype = PRECISIONS[args.precision] or (torch.float16 if on_gpu else torch.float32)
    pixel, latent, feed = _inputs(args.size, args.batch)
    if args.network == "decoder":
        sd = _weights(UNet1024, 0)
    else:
        sd = _weights(LatentTransparencyOffsetEncoder, 1)
    if args.impl == "reference":
        model = reference_decoder(sd).to(device)
        run = lambda: reference_decode(model, pixel.to(device), latent.to(device))  # noqa: E731
    elif args.impl == "baseline":
        sd = {k: v.to(device) for k, v in sd.items()}
        run = (lambda: baseline_decode(sd, pixel.to(device), latent.to(device))) if args.network == "decoder" \
            else (lambda: baseline_encode(sd, feed.to(device)))
    else:
        factory = UNet1024 if args.network == "decoder" else LatentTransparencyOffsetEncoder
        model = build_model(factory, sd, "benchmark", device=device, dtype=dtype)
        del sd  # the model holds its own (re-laid-out) copy
        if args.network == "decoder":
            run = lambda: decode_transparent(SD, model, pixel.to(device), latent.to(device), args.batch,  # noqa: E731
                                             passes=args.passes)
        else:
            run = lambda: model(feed.to(device, dtype).contiguous(memory_format=torch.channels_last))  # noqa: E731
    with torch.inference_mode():
        run()  # warm-up: first calls pick kernels and allocate
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            out = run()
            _sync(device)
            times.append(time.perf_counter() - start)
    torch.save(out.float().cpu(), args.output)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _peak_rss()
    return {"times": times, "peak_bytes": peak}


def _run_worker(base_args: argparse.Namespace, **overrides) -> tuple[dict, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        output = os.path.join(tmp, "out.pt")
        settings = {**vars(base_args), **overrides, "output": output}
        command = [sys.executable, __file__, "--worker"] + [
            f"--{k.replace('_', '-')}={v}" for k, v in settings.items()
            if k in ("device", "precision", "size", "batch", "repeats", "passes", "network", "impl", "output", "threads")]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-3000:])
        return json.loads(result.stdout.strip().splitlines()[-1]), torch.load(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                        help="the decode nodes' precision setting for ours (the baseline is always float32)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up run")
    parser.add_argument("--passes", type=int, default=8, choices=[1, 4, 8], help="augmentation passes of ours")
    parser.add_argument("--networks", nargs="+", default=["decoder", "encoder"], choices=["decoder", "encoder"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--reference", action="store_true",
                        help="also time the decoder as the existing packs build it (needs diffusers importable)")
    # worker-only
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--network", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args)))
        return

    print(f"device={args.device} precision={args.precision} passes={args.passes} batch={args.batch} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    print(f"{'network':8} {'size':>5} {'impl':9} {'median s':>9} {'speedup':>8} {'peak MiB':>9} {'max|diff|':>10}")
    for network in args.networks:
        for size in args.sizes:
            base, base_out = (None, None) if args.skip_baseline else _run_worker(
                args, size=size, network=network, impl="baseline", precision="float32", passes=8)
            ours, out = _run_worker(args, size=size, network=network, impl="ours")
            rows = ([("baseline", base, base_out)] if base else []) + [("ours", ours, out)]
            if args.reference and network == "decoder":
                ref, ref_out = _run_worker(args, size=size, network=network, impl="reference", precision="float32",
                                           passes=8)
                rows.insert(1, ("reference", ref, ref_out))
            base_time = sorted(base["times"])[len(base["times"]) // 2] if base else None
            for name, result, output in rows:
                median = sorted(result["times"])[len(result["times"]) // 2]
                speedup = f"{base_time / median:8.2f}" if base_time else f"{'-':>8}"
                diff = f"{(output - base_out).abs().max().item():10.2e}" if base_out is not None else f"{'-':>10}"
                print(f"{network:8} {size:5d} {name:9} {median:9.3f} {speedup} {result['peak_bytes'] / 2**20:9.0f} {diff}",
                      flush=True)


if __name__ == "__main__":
    main()
