"""What the suite needs from the machine (a ComfyUI host, a browser) and what a test does when it
is missing: skip with the reason, or fail under CI, where a missing host must never pass green."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NoReturn, Optional

import pytest

from .paths import PACK_ROOT


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip the test for `reason`; under CI (CI=true) fail it instead."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing host, data file or browser fails the run)", pytrace=False)
    pytest.skip(reason)


def find_comfyui() -> tuple[Optional[Path], str]:
    """(path, how it was looked for) of a ComfyUI checkout: COMFYUI_PATH, else the ComfyUI this
    pack is installed in (ComfyUI/custom_nodes/<pack>), else comfy-cli's ~/comfy/ComfyUI."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(PACK_ROOT.parent.parent)
    candidates.append(Path.home() / "comfy" / "ComfyUI")
    for candidate in candidates:
        if (candidate / "comfy" / "model_management.py").is_file() and (candidate / "main.py").is_file():
            return candidate.resolve(), ""
    return None, "no ComfyUI found (looked at: " + ", ".join(map(str, candidates)) + "); set COMFYUI_PATH"


def comfyui_version(path: Path) -> tuple[int, ...]:
    """The host's version (comfyui_version.py), e.g. (0, 33, 0)."""
    found = re.search(r"__version__\s*=\s*[\"']([\d.]+)", (path / "comfyui_version.py").read_text())
    return tuple(int(part) for part in found.group(1).split(".")) if found else ()
