"""Queueing prompts on a live ComfyUI server without waiting for each, following them over the
websocket, and what a finished prompt saved: its images' pixels and the server's memory."""
from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import psutil
from PIL import Image

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


class ProgressSocket:
    """A blocking reader of ComfyUI's websocket (aiohttp on an event loop of its own)."""

    def __init__(self, url: str):
        self._loop = asyncio.new_event_loop()
        self._session, self._websocket = self._loop.run_until_complete(self._connect(url))

    @staticmethod
    async def _connect(url: str):
        session = aiohttp.ClientSession()
        try:
            return session, await session.ws_connect(url)
        except BaseException:
            await session.close()
            raise

    def receive(self, timeout: float = 1.0) -> str | None:
        """The next text message; None for another kind. TimeoutError when none came in `timeout` s."""
        message = self._loop.run_until_complete(self._websocket.receive(timeout))
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            raise ServerError(f"the server closed the websocket ({message.type.name})")
        return message.data if message.type == aiohttp.WSMsgType.TEXT else None

    def close(self) -> None:
        self._loop.run_until_complete(self._websocket.close())
        self._loop.run_until_complete(self._session.close())
        self._loop.close()


def open_websocket(server: ComfyServer) -> tuple[ProgressSocket, str]:
    """(websocket, client id): the server sends this client the progress of the prompts queued
    with that id."""
    client_id = uuid.uuid4().hex
    return ProgressSocket(server.url.replace("http://", "ws://") + f"/ws?clientId={client_id}"), client_id


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
