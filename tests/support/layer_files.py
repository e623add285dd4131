"""Weight files where the pack's own code finds them: a layer_model folder put first in
ComfyUI's search paths for the duration of a block."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FOLDER = "layer_model"


@contextmanager
def layer_model_files(*files: os.PathLike | str) -> Iterator[Path]:
    """A temporary layer_model folder holding links to `files` (under their own names), searched
    before every other layer_model folder inside the block; the search paths are restored after."""
    import folder_paths

    saved = folder_paths.folder_names_and_paths.get(FOLDER)
    with tempfile.TemporaryDirectory(prefix="layer_model_") as folder:
        for file in files:
            os.symlink(os.path.abspath(file), os.path.join(folder, os.path.basename(file)))
        paths, extensions = saved if saved is not None else ([], {".safetensors"})
        folder_paths.folder_names_and_paths[FOLDER] = ([folder, *paths], set(extensions))
        try:
            yield Path(folder)
        finally:
            if saved is None:
                del folder_paths.folder_names_and_paths[FOLDER]
            else:
                folder_paths.folder_names_and_paths[FOLDER] = saved
