"""How much memory one image needs in the transparent decoder, the offset encoder and the RGBA
resize, and how many images of a batch go through at once in the memory that is free.

A batch needs the working memory of the images that run together plus what the results of the
whole batch hold. The per-pixel numbers are the growth of a process's peak resident memory over a
run, measured by benchmarks/bench_batch_memory.py at several sizes and dtypes, rounded up; the
working memory grows with the pixel count of the (padded) image.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError
from .unet1024 import SIZE_MULTIPLE

GIB = 1 << 30
MIB = 1 << 20

# Working memory of the decoder per pixel of the padded image, by where it runs (True: the CPU,
# through unet1024_cpu's executor, which reuses its storages; False: the plain network on an
# accelerator) and the byte size of the network's dtype; includes the input copies. On the CPU
# a half-precision network takes more, not less: torch's GroupNorm gives it new maps of its own.
DECODER_BYTES_PER_PIXEL = {(True, 4): 1050, (True, 2): 1700, (False, 4): 1800, (False, 2): 1200}
# What each pass adds: its clipped output waits in float32 ([passes,B,4,H,W]) for the median,
# which copies them.
PASS_BYTES_PER_PIXEL = 48
# The decoded batch in float32, the copy that joins the sub-batches, and the node's RGBA copy:
# held for every image of the batch, in CPU memory.
DECODED_BYTES_PER_PIXEL = 3 * 4 * 4
# What one decode allocates whatever the batch (kernel caches, attention buffers).
DECODER_OVERHEAD = 192 * MIB

# The offset encoder: per input pixel at float32 (its widest maps are 32 channels at full size).
ENCODER_BYTES_PER_PIXEL = {4: 420, 2: 240}
ENCODER_OVERHEAD = 64 * MIB

# Resizing RGBA (premultiplied colour, alpha and bled colour in float32, lanczos tap by tap): per
# output pixel of one image; the resized batch and its RGBA join, per output pixel of each image.
RESIZE_BYTES_PER_PIXEL = 180
RESIZED_BYTES_PER_PIXEL = 3 * 4 * 4
# An upscale model's colour and alpha runs (3 channels each in float32) and ComfyUI's tiling
# buffers, per pixel of the model's output; then the resize to the size asked for.
MODEL_OUTPUT_BYTES_PER_PIXEL = 4 * 2 * 3 * 4


@dataclass(frozen=True)
class BatchMemory:
    """What a batch needs: `per_image` bytes for each image that runs at once, plus `held` bytes
    (the results of the whole batch and fixed allocations) for as long as the batch runs."""
    per_image: int
    held: int

    def for_images(self, count: int) -> int:
        return self.held + count * self.per_image


def padded_pixels(height: int, width: int, multiple: int = SIZE_MULTIPLE) -> int:
    return (-(-height // multiple) * multiple) * (-(-width // multiple) * multiple)


def decoder_memory(height: int, width: int, batch: int, dtype_size: int, passes: int, on_cpu: bool) -> BatchMemory:
    """The transparent decode of `batch` height x width images with `passes` passes, the network
    in a dtype of `dtype_size` bytes, in the memory of its device (the results are in CPU memory)."""
    per_pixel = DECODER_BYTES_PER_PIXEL[on_cpu, min(dtype_size, 4)] + passes * PASS_BYTES_PER_PIXEL
    results = batch * height * width * DECODED_BYTES_PER_PIXEL if on_cpu else 0
    return BatchMemory(per_image=padded_pixels(height, width) * per_pixel, held=DECODER_OVERHEAD + results)


def encoder_memory(height: int, width: int, dtype_size: int) -> BatchMemory:
    """The offset encoder on height x width images, in a dtype of `dtype_size` bytes."""
    return BatchMemory(per_image=height * width * ENCODER_BYTES_PER_PIXEL[min(dtype_size, 4)], held=ENCODER_OVERHEAD)


def resize_memory(out_height: int, out_width: int, batch: int, model_scale: float | None = None,
                  in_height: int = 0, in_width: int = 0) -> BatchMemory:
    """Resizing `batch` RGBA images to out_height x out_width; through an upscale model of
    `model_scale` (its output then resized) when given."""
    per_image = out_height * out_width * RESIZE_BYTES_PER_PIXEL
    if model_scale is not None:
        model_pixels = round(in_height * model_scale) * round(in_width * model_scale)
        per_image = max(per_image, model_pixels * RESIZE_BYTES_PER_PIXEL // 2) + model_pixels * MODEL_OUTPUT_BYTES_PER_PIXEL
    return BatchMemory(per_image=per_image, held=batch * out_height * out_width * RESIZED_BYTES_PER_PIXEL)


def gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"


def images_at_once(memory: BatchMemory, free: int, batch: int, limit: int, work: str, cure: str) -> int:
    """How many images of `batch` run together: as many as `free` bytes hold, at most `limit`.
    Raises InputError, saying what is needed and `cure`, when not even one image fits."""
    fitting = (free - memory.held) // memory.per_image if memory.per_image else batch
    if fitting < 1:
        raise InputError(f"{work} needs about {gib(memory.for_images(1))} of memory"
                         f"{f' with {batch} images in the batch' if batch > 1 else ''}, but {gib(free)} are free: "
                         f"{cure}")
    return int(max(1, min(fitting, limit, batch)))


def largest_square_side(per_pixel: float, free: int, multiple: int = SIZE_MULTIPLE) -> int:
    """The side of the largest square image whose `per_pixel` bytes fit in `free` (a multiple of
    `multiple`; 0 when none does)."""
    side = int(max(free, 0) / per_pixel) ** 0.5 if per_pixel else 0
    return int(side) // multiple * multiple


def decoder_cure(height: int, width: int, batch: int, dtype_size: int, passes: int, on_cpu: bool,
                 free: int) -> str:
    """What to lower when not even one image fits in the decoder: the largest size that fits at
    these settings, and what one image needs at lower settings."""
    one = decoder_memory(height, width, batch, dtype_size, passes, on_cpu)
    per_pixel = (one.per_image + one.held - DECODER_OVERHEAD) / (height * width)
    side = largest_square_side(per_pixel, free - DECODER_OVERHEAD)
    options = [f"make the image smaller (about {side}x{side} fits with these settings)" if side
               else "free memory: there is not room for even a small image"]
    half = decoder_memory(height, width, batch, 2, passes, on_cpu)
    if dtype_size > 2 and half.for_images(1) < one.for_images(1):
        options.append(f"set precision to float16 (about {gib(half.for_images(1))})")
    if passes > 1:
        single = decoder_memory(height, width, batch, dtype_size, 1, on_cpu)
        options.append(f"set passes to 1 (about {gib(single.for_images(1))})")
    if batch > 1:
        options.append("decode fewer images at once")
    return "; ".join(options) + "; or close other programs and models to free memory"
