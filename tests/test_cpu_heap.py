"""The retained heap of half-precision CPU decodes: freed large blocks are reused without page
faults inside the block; after it glibc maps them again and the memory is returned."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lib_layerdiffuse import cpu_heap
from lib_layerdiffuse.transparent_vae import decode_transparent
from lib_layerdiffuse.unet1024 import UNet1024

pytestmark = pytest.mark.skipif(not cpu_heap.available(), reason="needs glibc (Linux): mallopt has no effect elsewhere")

# In a fresh interpreter: how many pages a block faults in depends on what earlier frees left in
# the heap, and a test session loads and drops gigabytes of weights.
SCRIPT = r"""
import resource
import torch
from lib_layerdiffuse import cpu_heap
from lib_layerdiffuse.transparent_vae import decode_transparent
from lib_layerdiffuse.unet1024 import UNet1024

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

torch.manual_seed(0)
model = UNet1024().eval().to(torch.bfloat16, memory_format=torch.channels_last)
faults, peak = [], []
def on_pass():
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    peak.append(rss())
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with torch.inference_mode():  # 512x512: the 64-channel bfloat16 maps are 32 MiB, glibc maps them
    decode_transparent(model, torch.rand(1, 3, 512, 512), torch.randn(1, 4, 64, 64), 1, on_pass, passes=4)
per_pass = [b - a for a, b in zip([start] + faults, faults)]
print(per_pass, max(peak) // 2**20, rss() // 2**20)
assert per_pass[0] > 20000, "the first pass faults its maps in"
# without the retained heap every pass faults about as much as the first
assert sum(per_pass[1:]) < per_pass[0] // 2, "later passes reuse them"
assert rss() < max(peak) - 100 * 2**20, "the kept memory went back to the system"
print("ok")
"""


def test_half_precision_decode_reuses_its_memory_and_returns_it():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
                            cwd=Path(cpu_heap.__file__).parent.parent)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr[-2000:]


def test_nested_and_concurrent_blocks_restore_only_when_the_last_one_ends():
    entered, release = threading.Event(), threading.Event()

    def other_decode() -> None:
        with cpu_heap.retained_heap():
            entered.set()
            release.wait(10)

    worker = threading.Thread(target=other_decode)
    with cpu_heap.retained_heap():
        with cpu_heap.retained_heap():
            pass
        assert cpu_heap.retaining()
        worker.start()
        assert entered.wait(10)
    assert cpu_heap.retaining()  # the other thread's block is still open
    release.set()
    worker.join()
    assert not cpu_heap.retaining()


@pytest.mark.parametrize("dtype,retains", [(torch.bfloat16, True), (torch.float32, False)])
def test_half_precision_cpu_decodes_run_in_a_retained_heap(dtype, retains):
    torch.manual_seed(0)
    model = UNet1024().eval().to(dtype=dtype, memory_format=torch.channels_last)
    seen = []
    with torch.inference_mode():
        decode_transparent(model, torch.rand(1, 3, 64, 64), torch.randn(1, 4, 8, 8), 1,
                           on_pass=lambda: seen.append(cpu_heap.retaining()), passes=4)
    assert seen == [retains] * 4
    assert not cpu_heap.retaining()


def test_large_half_precision_decodes_do_not_retain_the_heap():
    from lib_layerdiffuse.transparent_vae import RETAINED_HEAP_MAX_PIXELS, _retains_heap

    with torch.device("meta"):  # only its dtype matters
        model = UNet1024().to(torch.bfloat16)
    assert _retains_heap(model, torch.empty(1, 3, 1024, 1024))
    assert RETAINED_HEAP_MAX_PIXELS == 1024 * 1024
    assert not _retains_heap(model, torch.empty(1, 3, 1024, 1032))  # fragmentation grows with the maps
    assert not _retains_heap(model, torch.empty(2, 3, 1024, 1024))  # per sub-batch
