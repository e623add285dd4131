"""Downloading a missing weight file through huggingface_hub, against a throwaway Hub on 127.0.0.1
(support.fake_hub). huggingface_hub reads HF_ENDPOINT and its timeouts when it is imported, so
every download runs in a fresh Python process pointed at the fake Hub, as a ComfyUI server
started with HF_ENDPOINT would be."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from lib_layerdiffuse.weight_files import OFFICIAL_REPO, WEIGHT_FILES
from support.environment import unavailable
from support.fake_hub import PAYLOAD, SHA256, TOKEN, FakeHub, serving
from support.paths import PACK_ROOT

@pytest.fixture()
def hub():
    try:
        import huggingface_hub  # noqa: F401 (the downloads need it; ComfyUI's environments have it)
    except ImportError:
        unavailable("huggingface_hub is not installed")
    with serving() as server:
        yield server


FETCH = """
import json, sys
from lib_layerdiffuse.download import download
from lib_layerdiffuse.errors import WeightFileError
progress = []
try:
    path = download(sys.argv[1], sys.argv[2], sys.argv[3], lambda done, total: progress.append((done, total)))
    print(json.dumps({"path": path, "progress": progress}))
except WeightFileError as error:
    print(json.dumps({"error": str(error)}))
"""


def _environment(hub: FakeHub, tmp_path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                                "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_ETAG_TIMEOUT="1",
               HF_HUB_DOWNLOAD_TIMEOUT="1", HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1", **extra)
    return env


def _start(hub: FakeHub, tmp_path, name: str, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FETCH, OFFICIAL_REPO, name, str(tmp_path / "layer_model")],
                            cwd=PACK_ROOT, env=_environment(hub, tmp_path, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and out.strip(), err
    return json.loads(out.strip().splitlines()[-1])


def fetch(hub: FakeHub, tmp_path, name: str, **extra: str) -> dict:
    return _result(_start(hub, tmp_path, name, **extra))


def _left_in(folder) -> set[str]:
    """What a download left in the folder, its lock file aside."""
    return {p.name for p in folder.iterdir() if not p.name.endswith(".lock")} if folder.exists() else set()


def _manual_hint(hub: FakeHub, tmp_path, name: str) -> str:
    url = f"{hub.url}/{OFFICIAL_REPO}/resolve/main/{name}"
    return f"Download {url} and save it as {tmp_path / 'layer_model' / name}"


def test_download_writes_the_whole_file_reports_progress_and_sends_the_token(hub, tmp_path):
    result = fetch(hub, tmp_path, "ok.safetensors", HF_TOKEN=TOKEN)
    assert result["path"] == str(tmp_path / "layer_model" / "ok.safetensors")
    assert open(result["path"], "rb").read() == PAYLOAD
    assert result["progress"][-1] == [len(PAYLOAD), len(PAYLOAD)]
    assert _left_in(tmp_path / "layer_model") == {"ok.safetensors"}
    assert all(headers.get("authorization") == f"Bearer {TOKEN}" for _, _, headers in hub.requests)


def test_a_connection_cut_mid_file_resumes_with_a_range_request(hub, tmp_path):
    result = fetch(hub, tmp_path, "cut.safetensors")
    assert open(result["path"], "rb").read() == PAYLOAD
    first, second = hub.gets("cut.safetensors")
    assert "range" not in first
    resumed_at = int(second["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(PAYLOAD) // 2


def test_a_body_that_is_not_the_published_file_fails_and_leaves_nothing(hub, tmp_path):
    result = fetch(hub, tmp_path, "wrong.safetensors")
    assert "the downloaded wrong.safetensors is not the published file" in result["error"]
    assert f"expected {SHA256}" in result["error"]
    assert _manual_hint(hub, tmp_path, "wrong.safetensors") in result["error"]
    assert _left_in(tmp_path / "layer_model") == set()


@pytest.mark.parametrize("name", ["missing.safetensors", "stall.safetensors"])
def test_missing_file_and_timeout_say_where_to_put_the_file(hub, tmp_path, name):
    started = time.monotonic()
    result = fetch(hub, tmp_path, name)
    assert time.monotonic() - started < 30
    assert f"could not download {name}" in result["error"]
    assert _manual_hint(hub, tmp_path, name) in result["error"]
    assert _left_in(tmp_path / "layer_model") == set()
    assert hub.gets(name) == []


def test_two_processes_fetch_the_file_once(hub, tmp_path):
    first, second = (_start(hub, tmp_path, "slow.safetensors") for _ in range(2))
    paths = {_result(first)["path"], _result(second)["path"]}
    assert paths == {str(tmp_path / "layer_model" / "slow.safetensors")}
    assert open(paths.pop(), "rb").read() == PAYLOAD
    assert len(hub.gets("slow.safetensors")) == 1
    assert _left_in(tmp_path / "layer_model") == {"slow.safetensors"}


def test_offline_names_file_url_and_folder_without_a_request(hub, tmp_path):
    result = fetch(hub, tmp_path, "ok.safetensors", HF_HUB_OFFLINE="1")
    assert "ok.safetensors is not in" in result["error"] and "HF_HUB_OFFLINE is set" in result["error"]
    assert _manual_hint(hub, tmp_path, "ok.safetensors") in result["error"]
    assert hub.requests == []


def test_registry_lists_the_fourteen_official_files():
    official = [wf for wf in WEIGHT_FILES.values() if wf.repo_id == OFFICIAL_REPO]
    assert len(official) == 14
    assert {wf.family for wf in official} == {"SD15", "SDXL"}
    assert all(wf.url == f"https://huggingface.co/{OFFICIAL_REPO}/resolve/main/{wf.name}" for wf in official)
