"""workflows/queue_workflow.py, the command-line client: imported as a module, or run as users run it."""
from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from types import ModuleType

from .paths import WORKFLOW_DIR

CLIENT = WORKFLOW_DIR / "queue_workflow.py"


@functools.cache
def client_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("queue_workflow", CLIENT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def run_client(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The client in a subprocess of this Python (a ComfyUI environment, as users run it). -I
    (isolated mode): no PYTHONPATH, user site-packages or current folder on its path, so it
    imports only what that environment installs."""
    return subprocess.run([sys.executable, "-I", str(CLIENT), *args], capture_output=True, text=True, timeout=timeout)
