#!/usr/bin/env python3
"""Queue an API-format workflow on a running ComfyUI, follow it, and download its images.

Standard library only, so it runs with any Python 3.9+ (no need for ComfyUI's environment):

    python workflows/queue_workflow.py workflows/api/sd15_transparent_fg_attn.json \\
        --server http://127.0.0.1:8188 --prompt "a glass bottle" --seed 7 --width 512 --height 512 \\
        --output-dir out/

Progress comes over ComfyUI's websocket (/ws); when that is not available the script polls
/history. Exit status: 0 done, 1 bad arguments or workflow file, 2 server unreachable,
3 workflow rejected by the server (missing node, bad value), 4 execution error or interrupted,
5 timed out.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Iterable, Optional

EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REJECTED, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5
# Outside any checkout, so that running the client from the pack's folder leaves no files in it.
DEFAULT_OUTPUT_DIR = os.path.join(os.path.expanduser("~"), "layerdiffuse_output")

# Nodes whose latent batch must be a multiple of the frames they generate together.
FRAMES_PER_IMAGE = {"LayeredDiffusionJointApply": 3, "LayeredDiffusionCondJointApply": 2}


class ClientError(Exception):
    """A failure to report to the user: `str(error)` is the message, `exit_code` the status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# --- the workflow file ------------------------------------------------------------------------------

def load_workflow(path: str) -> dict:
    """The API-format workflow in `path` (node id -> {"class_type", "inputs"})."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as error:
        raise ClientError(f"cannot read {path}: {error.strerror}", EXIT_USAGE) from error
    except json.JSONDecodeError as error:
        raise ClientError(f"{path} is not valid JSON: {error}", EXIT_USAGE) from error
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ClientError(
            f"{path} is a UI-format workflow (what ComfyUI's Save writes). Queue its API-format twin "
            "instead (workflows/api/ in this pack), or export one from ComfyUI with Workflow > Export (API).",
            EXIT_USAGE)
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # the body of a /prompt request
    if not isinstance(data, dict) or not data or not all(
            isinstance(node, dict) and "class_type" in node and isinstance(node.get("inputs"), dict)
            for node in data.values()):
        raise ClientError(f"{path} is not an API-format workflow (node id -> class_type and inputs)", EXIT_USAGE)
    return data


def model_downloads(api_path: str) -> dict[str, dict]:
    """file name -> {"url", "directory"} from the `models` list of the workflow's UI twin (the
    file of the same name one folder up from workflows/api/), where ComfyUI's missing-models
    dialog takes them from; empty when there is no twin."""
    twin = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(api_path))), os.path.basename(api_path))
    try:
        with open(twin, encoding="utf-8") as handle:
            models = json.load(handle).get("models", [])
    except (OSError, ValueError, AttributeError):
        return {}
    return {m["name"]: m for m in models if isinstance(m, dict) and {"name", "url", "directory"} <= set(m)}


def _title(node: dict) -> str:
    return str(node.get("_meta", {}).get("title", ""))


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


CONDITIONING_INPUTS = ("cond", "conditioning", "positive", "conditioning_to", "conditioning_1")


def _text_node_behind(workflow: dict, link: Any) -> Optional[str]:
    """The text-encoder node a conditioning link comes from, through nodes that pass a
    conditioning on (Layer Diffuse Cond/Diff Apply, Flux Guidance, ...)."""
    seen = set()
    while _is_link(link) and link[0] in workflow and link[0] not in seen:
        node_id = link[0]
        seen.add(node_id)
        inputs = workflow[node_id]["inputs"]
        if isinstance(inputs.get("text"), str):
            return node_id
        if workflow[node_id]["class_type"] in ("LayeredDiffusionCondApply", "LayeredDiffusionDiffApply"):
            link = inputs.get("uncond" if link[1] == 2 else "cond")
            continue
        link = next((inputs[name] for name in CONDITIONING_INPUTS if _is_link(inputs.get(name))), None)
    return None


def prompt_nodes(workflow: dict, which: str) -> list[str]:
    """Ids of the nodes holding the positive (`which` = "positive") or negative prompt text:
    those titled "Positive prompt..." / "Negative prompt...", else the text encoders that feed
    the samplers' positive/negative inputs."""
    titled = [node_id for node_id, node in workflow.items()
              if _title(node).lower().startswith(which) and isinstance(node["inputs"].get("text"), str)]
    if titled:
        return titled
    def traced(side: str) -> list[str]:
        found = []
        for node in workflow.values():
            node_id = _text_node_behind(workflow, node["inputs"].get(side))
            if node_id is not None and node_id not in found:
                found.append(node_id)
        return found

    if which == "negative":  # e.g. Flux: the negative is the positive text zeroed out, not a prompt of its own
        positive = set(prompt_nodes(workflow, "positive"))
        return [node_id for node_id in traced("negative") if node_id not in positive]
    return traced(which)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set_literal(workflow: dict, names: Iterable[str], value: Any, check: Callable[[Any], bool] = lambda v: True) -> list[str]:
    """Set every literal (not linked) input called one of `names`; returns 'id.input' for each."""
    changed = []
    for node_id, node in workflow.items():
        for name in names:
            current = node["inputs"].get(name)
            if name in node["inputs"] and not _is_link(current) and check(current):
                node["inputs"][name] = value
                changed.append(f"{node_id}.{name}")
    return changed


def apply_overrides(workflow: dict, *, prompt: Optional[str] = None, negative: Optional[str] = None,
                    seed: Optional[int] = None, width: Optional[int] = None, height: Optional[int] = None,
                    batch: Optional[int] = None, sets: Iterable[str] = ()) -> list[str]:
    """Change `workflow` in place; returns a description of each change. Raises ClientError
    (EXIT_USAGE) when an override has nothing to apply to or a value cannot work."""
    changes: list[str] = []
    for which, text in (("positive", prompt), ("negative", negative)):
        if text is None:
            continue
        nodes = prompt_nodes(workflow, which)
        if not nodes:
            raise ClientError(f"--{'prompt' if which == 'positive' else 'negative'}: the workflow has no {which} "
                              "prompt node (a text encoder titled '"
                              f"{which.capitalize()} prompt' or feeding a sampler's {which} input)", EXIT_USAGE)
        for node_id in nodes:
            workflow[node_id]["inputs"]["text"] = text
            changes.append(f"{node_id}.text ({which} prompt)")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if seed is not None:
        changed = _set_literal(workflow, ("seed", "noise_seed"), seed, is_int)
        if not changed:
            raise ClientError("--seed: the workflow has no seed input", EXIT_USAGE)
        changes += changed
    for flag, value in (("width", width), ("height", height)):
        if value is None:
            continue
        if value < 16 or value % 8:
            raise ClientError(f"--{flag} {value}: use a multiple of 8 of at least 16 (Stable Diffusion latents are 1/8 "
                              "of the image size)", EXIT_USAGE)
        # A size of 0 means "follow the image" (e.g. Upscale (RGBA) by scale_by): it stays.
        changed = _set_literal(workflow, (flag,), value, lambda v: is_int(v) and v > 0)
        if not changed:
            raise ClientError(f"--{flag}: the workflow has no {flag} input", EXIT_USAGE)
        changes += changed
    if batch is not None:
        if batch < 1:
            raise ClientError("--batch must be at least 1", EXIT_USAGE)
        for node in workflow.values():
            frames = FRAMES_PER_IMAGE.get(node["class_type"])
            if frames and batch % frames:
                raise ClientError(f"--batch {batch}: this workflow's {node['class_type']} generates {frames} images per "
                                  f"result, so the batch must be a multiple of {frames}", EXIT_USAGE)
        changed = _set_literal(workflow, ("batch_size",), batch, is_int)
        if not changed:
            raise ClientError("--batch: the workflow has no batch_size input", EXIT_USAGE)
        changes += changed
    for item in sets:
        target, _, value = item.partition("=")
        key, _, input_name = target.rpartition(".")
        if not _ or not key or not input_name:
            raise ClientError(f"--set {item!r}: write NODE.INPUT=VALUE (NODE: a node id, class type or title)", EXIT_USAGE)
        matched = [node_id for node_id, node in workflow.items()
                   if key in (node_id, node["class_type"], _title(node))]
        if not matched:
            raise ClientError(f"--set {item!r}: no node has the id, class type or title {key!r}", EXIT_USAGE)
        for node_id in matched:
            inputs = workflow[node_id]["inputs"]
            if input_name not in inputs:
                raise ClientError(f"--set {item!r}: node {node_id} ({workflow[node_id]['class_type']}) has no input "
                                  f"{input_name!r}; it has: {', '.join(inputs)}", EXIT_USAGE)
            inputs[input_name] = _parse_value(value)
            changes.append(f"{node_id}.{input_name}")
    return changes


# --- a minimal websocket client (RFC 6455), enough for ComfyUI's /ws ----------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocket:
    def __init__(self, url: str, timeout: float):
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        self.sock, self.buffer = sock, b""
        self.message, self.text = b"", True
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + ("?" + parts.query if parts.query else "")
        request = (f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        sock.sendall(request.encode())
        while b"\r\n\r\n" not in self.buffer:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the connection during the websocket handshake")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept:
            raise ConnectionError(f"websocket handshake refused: {lines[0]}")

    @staticmethod
    def _parse(data: bytes) -> Optional[tuple[int, bool, bytes, int]]:
        """(opcode, final, payload, bytes used) of the frame at the start of `data`, or None
        while it is incomplete."""
        if len(data) < 2:
            return None
        length, pos = data[1] & 0x7F, 2
        if length in (126, 127):
            size = 2 if length == 126 else 8
            if len(data) < pos + size:
                return None
            length, pos = int.from_bytes(data[pos:pos + size], "big"), pos + size
        mask = None
        if data[1] & 0x80:
            if len(data) < pos + 4:
                return None
            mask, pos = data[pos:pos + 4], pos + 4
        if len(data) < pos + length:
            return None
        payload = data[pos:pos + length]
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return data[0] & 0x0F, bool(data[0] & 0x80), payload, pos + length

    def _next_frame(self) -> tuple[int, bool, bytes]:
        # A socket timeout leaves the buffer as it was, so a frame split across reads survives it.
        while True:
            frame = self._parse(self.buffer)
            if frame is not None:
                opcode, final, payload, used = frame
                self.buffer = self.buffer[used:]
                return opcode, final, payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the websocket was closed")
            self.buffer += chunk

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        elif len(payload) < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self) -> Optional[str]:
        """The next text message; None for a binary one (image previews). socket.timeout when
        nothing arrives in time, ConnectionError when the socket closes."""
        while True:
            opcode, final, payload = self._next_frame()
            if opcode == 0x8:
                raise ConnectionError("the server closed the websocket")
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode in (0x1, 0x2):
                self.message, self.text = payload, opcode == 0x1
            else:  # continuation of a fragmented message
                self.message += payload
            if final:
                message, self.message = self.message, b""
                return message.decode("utf-8") if self.text else None

    def close(self) -> None:
        try:
            self._send(0x8)
        except OSError:
            pass
        self.sock.close()


# --- talking to ComfyUI -----------------------------------------------------------------------------

class ComfyClient:
    def __init__(self, server: str, log: Callable[[str], None] = print, request_timeout: float = 30):
        self.server = server.rstrip("/")
        if not self.server.startswith(("http://", "https://")):
            self.server = "http://" + self.server
        self.log, self.request_timeout = log, request_timeout
        self.client_id = uuid.uuid4().hex

    def _unreachable(self, error: Exception) -> ClientError:
        reason = getattr(error, "reason", error)
        return ClientError(f"cannot reach ComfyUI at {self.server} ({reason}). Is it running? Start it with "
                           "`python main.py` (add --listen/--port to match) or pass the right --server.",
                           EXIT_UNREACHABLE)

    def request(self, path: str, payload: Optional[dict] = None) -> tuple[int, bytes]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.server + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except (urllib.error.URLError, OSError) as error:
            raise self._unreachable(error) from error

    def get_json(self, path: str) -> Any:
        status, body = self.request(path)
        if status != 200:
            raise ClientError(f"GET {path} answered HTTP {status}: {body[:300]!r}", EXIT_FAILED)
        return json.loads(body)

    def check_server(self) -> dict:
        try:
            return self.get_json("/system_stats")
        except (ClientError, ValueError) as error:
            if isinstance(error, ClientError) and error.exit_code == EXIT_UNREACHABLE:
                raise
            raise ClientError(f"{self.server} does not answer like ComfyUI (/system_stats: {error})",
                              EXIT_UNREACHABLE) from error

    def queue(self, workflow: dict, downloads: Optional[dict] = None) -> str:
        status, body = self.request("/prompt", {"prompt": workflow, "client_id": self.client_id})
        try:
            answer = json.loads(body or b"{}")
        except ValueError:
            answer = {}
        if status == 200 and "prompt_id" in answer:
            return answer["prompt_id"]
        raise ClientError(describe_rejection(status, answer, workflow, body, self.unknown_node_types(workflow),
                                             downloads or {}), EXIT_REJECTED)

    def unknown_node_types(self, workflow: dict) -> list[str]:
        """The workflow's node types this server does not have (newer servers name only the first)."""
        try:
            known = self.get_json("/object_info")
        except (ClientError, ValueError):
            return []
        return sorted({node["class_type"] for node in workflow.values()} - set(known))

    def open_websocket(self) -> Optional[WebSocket]:
        parts = urllib.parse.urlsplit(self.server)
        scheme = "wss" if parts.scheme == "https" else "ws"
        try:
            return WebSocket(f"{scheme}://{parts.netloc}/ws?clientId={self.client_id}", timeout=self.request_timeout)
        except (OSError, ConnectionError) as error:
            self.log(f"(no websocket: {error}; following the prompt through /history)")
            return None

    def history(self, prompt_id: str) -> Optional[dict]:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, websocket: Optional[WebSocket], timeout: float) -> dict:
        """The prompt's /history entry once it has finished (with or without error)."""
        deadline = time.monotonic() + timeout
        if websocket is not None:
            websocket.sock.settimeout(1.0)
        last_poll, finished = 0.0, False
        while time.monotonic() < deadline:
            if websocket is not None:
                try:
                    text = websocket.receive()
                    if text is not None:
                        finished = self._report(json.loads(text), prompt_id)
                except socket.timeout:
                    pass
                except (ConnectionError, OSError, ValueError):
                    websocket = None
            else:
                time.sleep(0.5)
            if finished or time.monotonic() - last_poll >= 1.0:
                last_poll = time.monotonic()
                entry = self.history(prompt_id)
                if entry is not None:  # /history lists a prompt once it has finished
                    return entry
        raise ClientError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; it is still in ComfyUI's queue "
                          "(cancel it there, or rerun with a larger --timeout)", EXIT_TIMEOUT)

    def _report(self, message: dict, prompt_id: str) -> bool:
        """Log a websocket message about our prompt; True when it says the prompt has ended."""
        kind, data = message.get("type"), message.get("data") or {}
        if data.get("prompt_id") not in (None, prompt_id):
            return False
        if kind in ("execution_success", "execution_error", "execution_interrupted"):
            return data.get("prompt_id") == prompt_id
        if kind == "execution_start":
            self.log("started")
        elif kind == "executing" and data.get("node") is not None:
            self.log(f"running node {data['node']}")
        elif kind == "progress":
            self.log(f"  node {data.get('node')}: {data.get('value')}/{data.get('max')}")
        elif kind == "execution_cached" and data.get("nodes"):
            self.log(f"cached: {', '.join(map(str, data['nodes']))}")
        return False

    def download(self, entry: dict, output_dir: str, previews: bool = False) -> list[str]:
        os.makedirs(output_dir, exist_ok=True)
        saved = []
        for node_id, output in entry.get("outputs", {}).items():
            for image in output.get("images", []):
                if image.get("type") != "output" and not previews:
                    continue
                query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                                "type": image.get("type", "output")})
                status, body = self.request(f"/view?{query}")
                if status != 200:
                    raise ClientError(f"could not download {image['filename']} (HTTP {status})", EXIT_FAILED)
                target = os.path.join(output_dir, os.path.basename(image["filename"]))
                with open(target, "wb") as handle:
                    handle.write(body)
                saved.append(target)
        return saved


def describe_rejection(status: int, answer: dict, workflow: dict, body: bytes, unknown_types: Iterable[str] = (),
                       downloads: Optional[dict] = None) -> str:
    """A readable account of a /prompt refusal: the error, the node types the server lacks, each
    node's problems, and for a missing model file where to get it or how to use one of your own."""
    error = answer.get("error")
    if not isinstance(error, dict):
        return f"ComfyUI rejected the workflow (HTTP {status}): {body[:500].decode('utf-8', 'replace')}"
    lines = [f"ComfyUI rejected the workflow: {error.get('message', 'invalid prompt')}"]
    if error.get("details"):
        lines.append(f"  {error['details']}")
    unknown = sorted(unknown_types)
    if unknown:
        lines.append(f"  Node types not installed in this ComfyUI: {', '.join(unknown)}. Install the custom node packs "
                     "that provide them (for Layer Diffuse nodes: this pack, in custom_nodes/) and restart ComfyUI.")
    for node_id, problem in (answer.get("node_errors") or {}).items():
        node = workflow.get(node_id, {})
        title = _title(node) or problem.get("class_type", "")
        for item in problem.get("errors", []):
            detail = f": {item['details']}" if item.get("details") else ""
            lines.append(f"  node {node_id} ({title}): {item.get('message', 'error')}{detail}")
            if item.get("type") == "value_not_in_list":
                lines.extend(_missing_file_hint(node, (item.get("extra_info") or {}).get("input_name"), downloads or {}))
    return "\n".join(lines)


def _missing_file_hint(node: dict, input_name: Optional[str], downloads: dict) -> list[str]:
    """Where to get a model file a node names but the server lacks, and how to use your own."""
    value = (node.get("inputs") or {}).get(input_name)
    if not isinstance(value, str) or not input_name:
        return []
    hint = []
    source = downloads.get(value)
    if source:
        hint.append(f"    {value}: download {source['url']} into ComfyUI/models/{source['directory']}/,")
    hint.append(f"    {'or use' if source else 'Use'} a file you have: --set {node.get('class_type')}.{input_name}=<file name>")
    return hint


def describe_failure(entry: dict) -> str:
    messages = entry.get("status", {}).get("messages", [])
    for kind, data in messages:
        if kind == "execution_error":
            lines = [f"execution failed in node {data.get('node_id')} ({data.get('node_type')}): "
                     f"{data.get('exception_type', 'error')}: {data.get('exception_message', '').strip()}"]
            return "\n".join(lines)
        if kind == "execution_interrupted":
            return f"execution was interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return f"execution did not succeed (status: {entry.get('status', {}).get('status_str')})"


# --- command line -----------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Queue an API-format ComfyUI workflow, follow its progress and download the images it saves.")
    parser.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/sd15_transparent_fg_attn.json)")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    parser.add_argument("--prompt", help="positive prompt text")
    parser.add_argument("--negative", help="negative prompt text")
    parser.add_argument("--seed", type=int, help="seed of every sampler")
    parser.add_argument("--width", type=int, help="image width (multiple of 8)")
    parser.add_argument("--height", type=int, help="image height (multiple of 8)")
    parser.add_argument("--batch", type=int, help="latent batch size (joint modes: a multiple of 3, or 2 for the "
                        "given-layer joint modes)")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="set any input; NODE is a node id, class type or title, VALUE is JSON or text "
                             "(e.g. --set CheckpointLoaderSimple.ckpt_name=my_model.safetensors --set KSampler.steps=8)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="where to write the images (default %(default)s)")
    parser.add_argument("--previews", action="store_true", help="also download preview images (temp outputs)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the result (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print only the saved file paths and errors")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        workflow = load_workflow(args.workflow)
        for change in apply_overrides(workflow, prompt=args.prompt, negative=args.negative, seed=args.seed,
                                      width=args.width, height=args.height, batch=args.batch, sets=args.set):
            log(f"set {change}")
        client = ComfyClient(args.server, log)
        client.check_server()
        websocket = client.open_websocket()
        try:
            prompt_id = client.queue(workflow, model_downloads(args.workflow))
            log(f"queued prompt {prompt_id} on {client.server}")
            entry = client.wait(prompt_id, websocket, args.timeout)
        finally:
            if websocket is not None:
                websocket.close()
        if entry.get("status", {}).get("status_str") != "success":
            raise ClientError(describe_failure(entry), EXIT_FAILED)
        saved = client.download(entry, args.output_dir, args.previews)
        if not saved:
            log("the workflow finished but saved no images")
        for path in saved:
            print(path)
        return EXIT_OK
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted (the prompt may still be running in ComfyUI)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
