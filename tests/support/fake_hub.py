"""A throwaway Hugging Face Hub on 127.0.0.1 for the download tests.

It answers the resolve endpoint as huggingface.co does for an LFS file: HEAD and GET with ETag,
X-Repo-Commit, X-Linked-Etag and X-Linked-Size, and Range requests. Each request is recorded.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import socket
import threading
import time
from typing import Iterator

REPO = "LayerDiffusion/layerdiffusion-v1"
# Larger than huggingface_hub's read chunk (10 MiB): it resumes from the last whole chunk it wrote.
PAYLOAD = bytes(range(256)) * (96 * 1024)
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_layerdiffuse_test_token"


class FakeHub(http.server.ThreadingHTTPServer):
    """The Hub's resolve endpoint for one repository. The file name chooses the behaviour:
    ok, cut (the first GET stops halfway), wrong (the body is not the published file), slow (the
    body arrives over about a second), stall (HEAD never answers); any other name is a 404."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, name: str) -> list[dict]:
        return [headers for method, path, headers in self.requests if method == "GET" and path.endswith("/" + name)]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _file_name(self) -> str | None:
        parts = self.path.split("/")
        if len(parts) == 6 and "/".join(parts[1:3]) == REPO and parts[3] == "resolve":
            return parts[5]
        return None

    def _record(self) -> str | None:
        with self.server.lock:
            self.server.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        name = self._file_name()
        if name is None or name.split(".")[0] not in ("ok", "cut", "wrong", "slow", "stall"):
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return name

    def _file_headers(self, status: int, start: int) -> None:
        self.send_response(status)
        self.send_header("ETag", f'"{SHA256}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("X-Linked-Etag", f'"{SHA256}"')
        self.send_header("X-Linked-Size", str(len(PAYLOAD)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.end_headers()

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        name = self._record()
        if name is None:
            return
        if name.startswith("stall"):
            time.sleep(5)
            return
        self._file_headers(200, 0)

    def do_GET(self):  # noqa: N802
        name = self._record()
        if name is None:
            return
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if self.headers.get("Range") else 0
        self._file_headers(206 if start else 200, start)
        body = PAYLOAD[start:]
        if name.startswith("wrong"):
            body = bytes(len(body))
        if name.startswith("cut") and len(self.server.gets(name)) == 1:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        pieces = 20 if name.startswith("slow") else 1
        step = -(-len(body) // pieces)
        for i in range(0, len(body), step):
            self.wfile.write(body[i:i + step])
            self.wfile.flush()
            if pieces > 1:
                time.sleep(0.05)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving() -> Iterator[FakeHub]:
    server = FakeHub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
