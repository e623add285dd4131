"""Keep freed memory in the process heap while a CPU decode runs (glibc only).

glibc serves every allocation from 32 MiB up with a mapping of its own and unmaps it when freed,
so a map that torch allocates afresh on every pass is faulted in again, page by page, each time.
Inside `retained_heap()` such blocks come from the heap and stay there when freed, so only the
first pass faults. On leaving, glibc is set to the state a torch process reaches by itself (see
RESTORED) and the freed memory goes back to the system. Elsewhere (another libc, another OS)
the block changes nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

RETAINING = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
# glibc's own values once its dynamic threshold has seen a freed block of the 32 MiB maximum,
# as any torch process working on images has: blocks from 32 MiB are mapped, and up to 64 MiB
# free at the top of the heap is kept.
RESTORED = ((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 32 * 2**20), (M_TRIM_THRESHOLD, 64 * 2**20))

_lock = threading.Lock()
_depth = 0


def _load_glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_glibc()


def available() -> bool:
    """Whether `retained_heap` has an effect in this process."""
    return _libc is not None


def retaining() -> bool:
    """Whether a `retained_heap` block is active (in any thread)."""
    return _depth > 0


def _set(settings: tuple[tuple[int, int], ...]) -> None:
    for parameter, value in settings:
        _libc.mallopt(parameter, value)


@contextmanager
def retained_heap() -> Iterator[None]:
    """Within this block (nestable, from any thread) freed blocks stay in the heap for reuse.
    It also holds for other threads' allocations meanwhile, which is harmless: they go back to
    the system with the rest when the last block ends."""
    global _depth
    if _libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _set(RETAINING)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(RESTORED)
                _libc.malloc_trim(0)
