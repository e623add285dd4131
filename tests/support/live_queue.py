"""Queueing prompts on a live ComfyUI server without waiting for each, following them over the
websocket, and what a finished prompt saved: its images' pixels and the server's memory."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from .client import client_module
from .server import ComfyServer, ServerError

# ComfyUI's prompt worker collects garbage once it has been idle this long after a prompt.
HOST_GC_INTERVAL_S = 10.0


def queue(server: ComfyServer, prompt: dict, client_id: str | None = None) -> str:
    """Queue an API-format prompt; its prompt id."""
    payload = {"prompt": prompt, **({"client_id": client_id} if client_id else {})}
    status, body = server.post("/prompt", payload)
    assert status == 200, f"prompt rejected: {str(body)[:3000]}"
    return body["prompt_id"]


def wait_all(server: ComfyServer, prompt_ids: list[str], timeout_s: float = 900) -> list[dict]:
    """The /history entries of prompts queued earlier, once all have finished."""
    deadline, entries = time.time() + timeout_s, {}
    while len(entries) < len(prompt_ids):
        if time.time() > deadline:
            raise TimeoutError(f"{len(prompt_ids) - len(entries)} prompts did not finish in {timeout_s}s")
        if server.process.poll() is not None:
            raise ServerError("the server died: " + server.log_tail())
        history = server.get("/history?max_items=1000")
        entries.update({p: history[p] for p in prompt_ids if p in history})
        time.sleep(0.5)
    return [entries[p] for p in prompt_ids]


def open_websocket(server: ComfyServer):
    """(websocket, client id): the server sends this client the progress of the prompts queued
    with that id."""
    client_id = uuid.uuid4().hex
    websocket = client_module().WebSocket(server.url.replace("http://", "ws://") + f"/ws?clientId={client_id}",
                                          timeout=60)
    websocket.sock.settimeout(1.0)
    return websocket, client_id


def saved_pixels(server: ComfyServer, entry: dict) -> dict[str, np.ndarray]:
    """"<node id>/<index>" -> the pixels (with their mode's channels) of every image a finished
    prompt saved to output/ (Save Image, Save Layers)."""
    pixels = {}
    for node_id, output in entry["outputs"].items():
        for index, image in enumerate(output.get("images", [])):
            if image.get("type") != "output":
                continue
            path = server.base / "output" / image.get("subfolder", "") / image["filename"]
            with Image.open(Path(path)) as png:
                pixels[f"{node_id}/{index}"] = np.array(png) if png.mode in ("RGB", "RGBA") else np.array(png.convert("RGBA"))
    return pixels


def cached_nodes(entry: dict) -> set[str]:
    """The nodes a finished prompt took from the cache instead of running them."""
    return {str(n) for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


def idle_rss(server: ComfyServer) -> int:
    """The server process's resident memory once its queue is empty and it has had the idle moment
    in which it collects garbage."""
    deadline = time.time() + 600
    while True:
        queue_state = server.get("/queue")
        if not queue_state["queue_running"] and not queue_state["queue_pending"]:
            break
        if time.time() > deadline:
            raise TimeoutError("the queue did not empty")
        time.sleep(0.5)
    time.sleep(HOST_GC_INTERVAL_S + 2)
    return psutil.Process(server.process.pid).memory_info().rss
