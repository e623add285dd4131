"""Writing a file so that readers see either nothing or the whole file, never a half-written one."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[str]:
    """A scratch path, in a private folder beside `path`, for the block to write the file to.
    When the block ends without error the file is renamed to `path` (one atomic step on the same
    filesystem); whatever happens, the scratch folder is removed."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{name}.", suffix=".part", dir=folder)
    try:
        yield os.path.join(scratch, name)
        os.replace(os.path.join(scratch, name), path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
