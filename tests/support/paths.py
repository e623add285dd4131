"""Where the pack and the suite's data are."""
from __future__ import annotations

from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = PACK_ROOT / "tests" / "data"
TESTKIT_DIR = DATA_DIR / "testkit"
COMPAT_DIR = DATA_DIR / "compat" / "huchenlei-example-workflows"
WORKFLOW_DIR = PACK_ROOT / "workflows"
API_DIR = WORKFLOW_DIR / "api"
