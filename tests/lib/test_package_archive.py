"""The registry archive, as `comfy node pack` (comfy-cli) makes it: the files git tracks, less
those that a line of .comfyignore matches (git's wildmatch patterns, through `pathspec`, as
comfy-cli reads them), plus the paths of pyproject.toml's [tool.comfy] includes. Every user who
installs from the registry downloads it, so it holds what runs in ComfyUI and nothing the
developers alone use."""
from __future__ import annotations

import shutil
import subprocess
import tomllib
import warnings
import zipfile
from pathlib import Path

import pytest

from support.environment import unavailable
from support.paths import PACK_ROOT

DEVELOPMENT_ONLY = ("tests/", ".ci/", "benchmarks/")
LIMIT_BYTES = 1_000_000


def tracked_files() -> list[str]:
    git = shutil.which("git")
    if git is None:
        unavailable("git not installed (comfy-cli packs the files git tracks)")
    listed = subprocess.run([git, "-C", str(PACK_ROOT), "ls-files"], capture_output=True, text=True)
    if listed.returncode != 0:
        unavailable(f"{PACK_ROOT} is not a git checkout: {listed.stderr.strip()}")
    return [line for line in listed.stdout.splitlines() if line.strip()]


def archive_files() -> list[str]:
    """The archive's paths, chosen as comfy-cli's `zip_files` chooses them."""
    try:
        from pathspec import PathSpec
    except ImportError:
        unavailable("pathspec not installed (pip install -r tests/requirements.txt)")
    lines = (PACK_ROOT / ".comfyignore").read_text(encoding="utf-8").splitlines()
    with warnings.catch_warnings():
        # comfy-cli still asks for the deprecated name of git's pattern syntax.
        warnings.simplefilter("ignore", DeprecationWarning)
        ignored = PathSpec.from_lines("gitwildmatch", [l.strip() for l in lines
                                                       if l.strip() and not l.lstrip().startswith("#")])
    comfy = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["comfy"]
    includes = [i.strip("/") for i in comfy.get("includes", [])]

    def kept(path: str) -> bool:
        forced = any(path == i or path.startswith(i + "/") for i in includes)
        return forced or not ignored.match_file(path)

    files = [p for p in tracked_files() if kept(p)]
    for include in includes:
        found = [include] if (PACK_ROOT / include).is_file() else [
            p.relative_to(PACK_ROOT).as_posix() for p in sorted((PACK_ROOT / include).rglob("*")) if p.is_file()]
        files += [p for p in found if p not in files]
    return files


@pytest.fixture(scope="module")
def archive() -> list[str]:
    return archive_files()


def test_archive_holds_what_runs_and_nothing_for_developers(archive):
    assert not [p for p in archive if p.startswith(DEVELOPMENT_ONLY)]
    runs = [p for p in tracked_files() if not p.startswith(DEVELOPMENT_ONLY) and not p.startswith(".")]
    assert sorted(archive) == sorted(runs)
    folders = {p.split("/")[0] for p in archive}
    assert {"__init__.py", "nodes", "lib_layerdiffuse", "locales", "workflows", "pyproject.toml",
            "requirements.txt", "LICENSE", "README.md"} <= folders
    assert {p for p in tracked_files() if p.startswith("workflows/")} <= set(archive)


def test_archive_is_under_one_megabyte(archive, tmp_path: Path):
    zipped = tmp_path / "node.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive_file:
        for path in archive:
            archive_file.write(PACK_ROOT / path, path)
    assert zipped.stat().st_size < LIMIT_BYTES, f"{zipped.stat().st_size} bytes"
