"""Fetching a missing weight file: streamed to a temporary name, renamed only when complete.

Offline (HF_HUB_OFFLINE=1) or on any failure the error names the file, its URL and the folder to
put it in by hand, and nothing half-written is left behind.
"""
from __future__ import annotations

import http.client
import os
import tempfile
import urllib.error
import urllib.request
from typing import Callable, Optional

from .errors import WeightFileError

CHUNK = 1 << 20
TIMEOUT_S = 30


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _manual_hint(name: str, url: str, folder: str) -> str:
    return f"Download {url} and save it as {os.path.join(folder, name)}"


def offline_message(name: str, url: str, folder: str) -> str:
    """What to do about a file that is missing while downloads are off."""
    return f"{name} is not in {folder} and HF_HUB_OFFLINE is set. {_manual_hint(name, url, folder)}"


def download(url: str, folder: str, name: str, on_progress: Optional[Callable[[int, int], None]] = None) -> str:
    """Download `url` to `folder/name` and return that path.

    `on_progress(done_bytes, total_bytes)` is called as data arrives (total is 0 when unknown).
    """
    target = os.path.join(folder, name)
    if offline():
        raise WeightFileError(offline_message(name, url, folder))
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done, total)
        if total and done != total:
            raise OSError(f"connection closed after {done} of {total} bytes")
        os.replace(partial, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        raise WeightFileError(f"could not download {name} ({error}). {_manual_hint(name, url, folder)}") from error
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target
