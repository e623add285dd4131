"""Fetching a missing weight file from the Hugging Face Hub through huggingface_hub.

huggingface_hub brings what a download needs: HF_ENDPOINT (a mirror), HF_TOKEN, HF_HUB_OFFLINE,
resuming a transfer cut mid-file, and a check of the size. On top of it, this module checks the
sha256 of LFS files against the Hub's ETag, lets one process fetch a file while the others wait for
it (a lock beside the file), and puts the file under its final name only once it is whole and
verified. Any failure names the file, its URL and the folder to put it in by hand.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Callable, Optional

from .atomic_write import atomic_write
from .errors import WeightFileError

HUB = "https://huggingface.co"
CHUNK = 1 << 20


def _hub():
    """The huggingface_hub module, or None where the environment lacks it."""
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.utils
    except ImportError:
        return None
    return huggingface_hub


def hub_url(repo_id: str, name: str) -> str:
    """The file's address on the Hub, or on the mirror HF_ENDPOINT names."""
    hub = _hub()
    return hub.hf_hub_url(repo_id, name) if hub is not None else f"{HUB}/{repo_id}/resolve/main/{name}"


def manual_hint(repo_id: str, name: str, folder: str) -> str:
    return f"Download {hub_url(repo_id, name)} and save it as {os.path.join(folder, name)}"


def downloads_off_reason() -> Optional[str]:
    """Why no file can be downloaded now (HF_HUB_OFFLINE, or no huggingface_hub); None when they can."""
    hub = _hub()
    if hub is None:
        return "huggingface_hub, which downloads it, is not installed (pip install huggingface_hub)"
    # huggingface_hub reads HF_HUB_OFFLINE once, when it is imported; a value set since is honoured too.
    set_since = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    if hub.constants.HF_HUB_OFFLINE or set_since:
        return "HF_HUB_OFFLINE is set"
    return None


def not_downloadable_message(repo_id: str, name: str, folder: str, reason: str) -> str:
    return f"{name} is not in {folder} and {reason}. {manual_hint(repo_id, name, folder)}"


def download(repo_id: str, name: str, folder: str,
             on_progress: Optional[Callable[[int, int], None]] = None) -> str:
    """Download `name` from the Hub repository `repo_id` to `folder/name` and return that path.

    `on_progress(done_bytes, total_bytes)` is called as data arrives (total is 0 when unknown).
    """
    reason = downloads_off_reason()
    if reason is not None:
        raise WeightFileError(not_downloadable_message(repo_id, name, folder, reason))
    hub = _hub()
    target = os.path.join(folder, name)
    try:
        os.makedirs(folder, exist_ok=True)
        with hub.utils.WeakFileLock(os.path.join(folder, f".{name}.lock")):
            if os.path.isfile(target):
                return target  # another process fetched it while this one waited for the lock
            metadata = hub.get_hf_file_metadata(hub.hf_hub_url(repo_id, name))
            with atomic_write(target) as scratch:
                fetched = hub.hf_hub_download(
                    repo_id, name, revision=metadata.commit_hash, local_dir=os.path.dirname(scratch),
                    tqdm_class=_reporting_bar(on_progress) if on_progress is not None else None)
                _verify(fetched, metadata.etag, name)
    except WeightFileError as error:
        raise WeightFileError(f"{error}. {manual_hint(repo_id, name, folder)}") from error
    # huggingface_hub's transport errors come from the HTTP library it is built on, which differs
    # between its versions (requests, httpx, httpx2): they share no base class below Exception.
    except Exception as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightFileError(f"could not download {name} ({cause}). {manual_hint(repo_id, name, folder)}") from error
    return target


def _verify(path: str, etag: Optional[str], name: str) -> None:
    """Check the downloaded bytes against the Hub's ETag: the sha256 of an LFS file, the git blob
    sha1 of a small one. An ETag of neither form cannot be checked (logged)."""
    etag = (etag or "").lower()
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        digest = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", etag):
        digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    else:
        logging.warning("LayerDiffuse: %s was downloaded but not verified (the server's ETag %r is no hash)", name, etag)
        return
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != etag:
        raise WeightFileError(f"the downloaded {name} is not the published file ({digest.name} "
                              f"{digest.hexdigest()}, expected {etag}); it was discarded")


def _reporting_bar(on_progress: Callable[[int, int], None]):
    """A tqdm class for huggingface_hub that also hands each step to `on_progress`."""
    from tqdm import tqdm

    class ReportingBar(tqdm):
        def update(self, n=1):
            shown = super().update(n)
            on_progress(self.n, self.total or 0)
            return shown

    return ReportingBar
