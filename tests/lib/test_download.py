"""Downloading a missing weight file, against a throwaway HTTP server on 127.0.0.1."""
from __future__ import annotations

import http.server
import threading

import pytest

from lib_layerdiffuse.download import download
from lib_layerdiffuse.weight_files import OFFICIAL_REPO, WEIGHT_FILES, WeightFileError

PAYLOAD = bytes(range(256)) * 5000


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/ok":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/cut":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])
            self.wfile.flush()
            self.connection.shutdown(2)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(autouse=True)
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_download_writes_the_whole_file_and_reports_progress(server, tmp_path):
    seen = []
    path = download(server + "/ok", str(tmp_path / "layer_model"), "x.safetensors", lambda d, t: seen.append((d, t)))
    assert open(path, "rb").read() == PAYLOAD
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD)) and len(seen) >= 1
    assert [p.name for p in (tmp_path / "layer_model").iterdir()] == ["x.safetensors"]


@pytest.mark.parametrize("route", ["/cut", "/missing"])
def test_failed_download_leaves_nothing_and_says_what_to_do(server, tmp_path, route):
    folder = tmp_path / "layer_model"
    with pytest.raises(WeightFileError) as error:
        download(server + route, str(folder), "x.safetensors")
    assert "could not download x.safetensors" in str(error.value)
    assert f"Download {server + route} and save it as {folder / 'x.safetensors'}" in str(error.value)
    assert list(folder.iterdir()) == []


def test_offline_names_file_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weight_file = WEIGHT_FILES["vae_transparent_decoder.safetensors"]
    with pytest.raises(WeightFileError) as error:
        download(weight_file.url, str(tmp_path), weight_file.name)
    text = str(error.value)
    assert "HF_HUB_OFFLINE" in text and weight_file.url in text and str(tmp_path / weight_file.name) in text
    assert weight_file.url == ("https://huggingface.co/LayerDiffusion/layerdiffusion-v1/resolve/main/"
                               "vae_transparent_decoder.safetensors")


def test_registry_lists_the_fourteen_official_files():
    official = [wf for wf in WEIGHT_FILES.values() if wf.url.startswith(OFFICIAL_REPO)]
    assert len(official) == 14
    assert {wf.family for wf in official} == {"SD15", "SDXL"}
    assert all(wf.url == OFFICIAL_REPO + wf.name for wf in official)
