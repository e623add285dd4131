#!/usr/bin/env python3
"""Queue API-format workflows on running ComfyUI servers, follow them, and download their images.

Run it with ComfyUI's Python (it needs aiohttp and tqdm, which every ComfyUI environment has).
One job:

    python workflows/queue_workflow.py workflows/api/sd15_transparent_fg_attn.json \\
        --server http://127.0.0.1:8188 --prompt "a glass bottle" --seed 7 --width 512 --height 512 \\
        --output-dir out/

Progress comes over ComfyUI's websocket (/ws); when that is not available the script polls
/history. Exit status: 0 done, 1 bad arguments or workflow file, 2 server unreachable,
3 workflow rejected by the server (missing node, bad value), 4 execution error or interrupted,
5 timed out.

A batch (--jobs FILE, one JSON object a line) runs on every --server given, each server's queue
working through its share; each job's images land in OUTPUT_DIR/<job id>/, and a job whose
folder exists is skipped, so the same command resumes an interrupted run. Exit status: 0 every
job done or skipped, 1 bad arguments or jobs file, 2 no server reachable, 4 a job failed (the
summary says why).
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import urllib.parse
import uuid
from typing import Any, Callable, Iterable, Optional

try:
    import aiohttp
    from tqdm import tqdm
except ImportError as missing:
    sys.exit(f"queue_workflow.py needs {missing.name}, which ComfyUI installs: run it with the Python that runs "
             "ComfyUI's main.py (or `pip install aiohttp tqdm`)")

EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REJECTED, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
# Outside any checkout, so that running the client from the pack's folder leaves no files in it.
DEFAULT_OUTPUT_DIR = os.path.join(os.path.expanduser("~"), "layerdiffuse_output")
DEFAULT_SERVER = "http://127.0.0.1:8188"

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


# --- talking to ComfyUI -----------------------------------------------------------------------------

Report = Callable[[dict, Optional[str]], bool]


class ComfyClient:
    """One ComfyUI server, over an aiohttp session."""

    def __init__(self, server: str, session: aiohttp.ClientSession, log: Callable[[str], None] = print,
                 request_timeout: float = 30):
        self.server = server.rstrip("/")
        if not self.server.startswith(("http://", "https://")):
            self.server = "http://" + self.server
        self.session, self.log = session, log
        self.request_timeout = aiohttp.ClientTimeout(total=request_timeout)

    def _unreachable(self, error: Exception) -> ClientError:
        reason = error if str(error) else f"no answer within {self.request_timeout.total:.0f} s"
        return ClientError(f"cannot reach ComfyUI at {self.server} ({reason}). Is it running? Start it with "
                           "`python main.py` (add --listen/--port to match) or pass the right --server.",
                           EXIT_UNREACHABLE)

    async def request(self, path: str, payload: Optional[dict] = None) -> tuple[int, bytes]:
        try:
            async with self.session.request("GET" if payload is None else "POST", self.server + path, json=payload,
                                            timeout=self.request_timeout) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            raise self._unreachable(error) from error

    async def get_json(self, path: str) -> Any:
        status, body = await self.request(path)
        if status != 200:
            raise ClientError(f"GET {path} answered HTTP {status}: {body[:300]!r}", EXIT_FAILED)
        return json.loads(body)

    async def check_server(self) -> dict:
        try:
            return await self.get_json("/system_stats")
        except (ClientError, ValueError) as error:
            if isinstance(error, ClientError) and error.exit_code == EXIT_UNREACHABLE:
                raise
            raise ClientError(f"{self.server} does not answer like ComfyUI (/system_stats: {error})",
                              EXIT_UNREACHABLE) from error

    async def queue(self, workflow: dict, client_id: str, downloads: Optional[dict] = None) -> str:
        status, body = await self.request("/prompt", {"prompt": workflow, "client_id": client_id})
        try:
            answer = json.loads(body or b"{}")
        except ValueError:
            answer = {}
        if status == 200 and "prompt_id" in answer:
            return answer["prompt_id"]
        raise ClientError(describe_rejection(status, answer, workflow, body, await self.unknown_node_types(workflow),
                                             downloads or {}), EXIT_REJECTED)

    async def unknown_node_types(self, workflow: dict) -> list[str]:
        """The workflow's node types this server does not have (newer servers name only the first)."""
        try:
            known = await self.get_json("/object_info")
        except (ClientError, ValueError):
            return []
        return sorted({node["class_type"] for node in workflow.values()} - set(known))

    async def open_websocket(self, client_id: str) -> Optional[aiohttp.ClientWebSocketResponse]:
        parts = urllib.parse.urlsplit(self.server)
        scheme = "wss" if parts.scheme == "https" else "ws"
        try:
            return await self.session.ws_connect(f"{scheme}://{parts.netloc}/ws?clientId={client_id}", max_msg_size=0)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            self.log(f"(no websocket: {error}; following the prompt through /history)")
            return None

    async def history(self, prompt_id: str) -> Optional[dict]:
        return (await self.get_json(f"/history/{prompt_id}")).get(prompt_id)

    async def run(self, workflow: dict, timeout: float, report: Report, downloads: Optional[dict] = None) -> dict:
        """Queue `workflow` and follow it; returns its /history entry once it has finished (with or
        without error). Each run has its own client id, so its websocket carries only its own
        prompt's messages; `report(message, prompt_id)` sees each and says when the prompt ended."""
        client_id = uuid.uuid4().hex
        websocket = await self.open_websocket(client_id)
        ended, prompt_ids = asyncio.Event(), []
        listener = asyncio.create_task(_listen(websocket, report, prompt_ids, ended)) if websocket else None
        try:
            prompt_id = await self.queue(workflow, client_id, downloads)
            prompt_ids.append(prompt_id)
            self.log(f"queued prompt {prompt_id} on {self.server}")
            return await self._wait(prompt_id, ended, timeout)
        finally:
            if listener is not None:
                listener.cancel()
            if websocket is not None:
                await websocket.close()

    async def _wait(self, prompt_id: str, ended: asyncio.Event, timeout: float) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:  # the websocket's word that the prompt ended, else a look at /history each second
                await asyncio.wait_for(ended.wait(), min(1.0, max(deadline - loop.time(), 0.01)))
            except asyncio.TimeoutError:
                pass
            entry = await self.history(prompt_id)
            if entry is not None:  # /history lists a prompt once it has finished
                return entry
            if ended.is_set():  # ended, but not yet written to the history
                await asyncio.sleep(0.1)
        raise ClientError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; it is still in ComfyUI's queue "
                          "(cancel it there, or rerun with a larger --timeout)", EXIT_TIMEOUT)

    async def download(self, entry: dict, output_dir: str, previews: bool = False) -> list[str]:
        os.makedirs(output_dir, exist_ok=True)
        saved = []
        for node_id, output in entry.get("outputs", {}).items():
            for image in output.get("images", []):
                if image.get("type") != "output" and not previews:
                    continue
                query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                                "type": image.get("type", "output")})
                status, body = await self.request(f"/view?{query}")
                if status != 200:
                    raise ClientError(f"could not download {image['filename']} (HTTP {status})", EXIT_FAILED)
                target = os.path.join(output_dir, os.path.basename(image["filename"]))
                with open(target, "wb") as handle:
                    handle.write(body)
                saved.append(target)
        return saved


async def _listen(websocket: aiohttp.ClientWebSocketResponse, report: Report, prompt_ids: list, ended: asyncio.Event):
    """Hand each text message to `report` until the socket closes (a server that goes away is
    then noticed by the next /history request)."""
    async for message in websocket:
        if message.type != aiohttp.WSMsgType.TEXT:
            continue  # binary: an image preview
        try:
            data = json.loads(message.data)
        except ValueError:
            continue
        if isinstance(data, dict) and report(data, prompt_ids[0] if prompt_ids else None):
            ended.set()


PROMPT_ENDS = ("execution_success", "execution_error", "execution_interrupted")


def progress_line(message: dict, prompt_id: Optional[str]) -> tuple[bool, Optional[str]]:
    """(whether the message says the prompt ended, the line to log for it or None)."""
    kind, data = message.get("type"), message.get("data") or {}
    if data.get("prompt_id") not in (None, prompt_id) and prompt_id is not None:
        return False, None
    if kind in PROMPT_ENDS:
        return True, None
    if kind == "execution_start":
        return False, "started"
    if kind == "executing" and data.get("node") is not None:
        return False, f"running node {data['node']}"
    if kind == "progress":
        return False, f"  node {data.get('node')}: {data.get('value')}/{data.get('max')}"
    if kind == "execution_cached" and data.get("nodes"):
        return False, f"cached: {', '.join(map(str, data['nodes']))}"
    return False, None


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


# --- batches: a file of jobs over several servers -----------------------------------------------------

# Value types of a jobs-file line's keys; "set" holds NODE.INPUT=VALUE strings or {"NODE.INPUT": value}.
JOB_KEYS = {"id": str, "workflow": str, "prompt": str, "negative": str, "seed": int, "width": int, "height": int,
            "batch": int, "set": (list, dict)}
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Prompts each server holds at once: one running, one waiting in its queue for when it ends.
JOBS_PER_SERVER = 2


@dataclasses.dataclass
class Job:
    line: int
    id: str
    workflow_path: str
    workflow: dict
    spec: dict


@dataclasses.dataclass
class Outcome:
    job: Job
    state: str  # "done", "failed" or "skipped"
    detail: str = ""  # done: the server; failed: why


def _job_sets(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [f"{target}={json.dumps(setting)}" for target, setting in value.items()]
    if not all(isinstance(item, str) for item in value):
        raise ClientError('"set" holds "NODE.INPUT=VALUE" strings, or is an object {"NODE.INPUT": value}', EXIT_USAGE)
    return list(value)


def derived_job_id(workflow: dict) -> str:
    """The prompt text made into a folder name, then a digest of the whole queued workflow: the same
    job on the same line or another, today or after a crash, has the same id; any change makes a new one."""
    digest = hashlib.sha256(json.dumps(workflow, sort_keys=True).encode()).hexdigest()[:10]
    texts = [workflow[node_id]["inputs"]["text"] for node_id in prompt_nodes(workflow, "positive")]
    slug = re.sub(r"[^a-z0-9]+", "-", (texts[0] if texts else "").lower())[:40].strip("-")
    return f"{slug}-{digest}" if slug else digest


def read_jobs(path: str, defaults: argparse.Namespace) -> list[Job]:
    """The jobs in `path`, one JSON object a line (blank lines and lines starting with # are
    skipped). Command-line options are the defaults each line may override; --set values apply
    before the line's own. A line's workflow path is relative to the jobs file's folder."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise ClientError(f"cannot read {path}: {error.strerror}", EXIT_USAGE) from error
    workflows: dict[str, dict] = {}
    jobs: list[Job] = []
    lines_of: dict[str, int] = {}
    for number, text in enumerate(lines, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        where = f"{path}, line {number}"
        try:
            spec = json.loads(text)
            if not isinstance(spec, dict):
                raise ClientError("a job is one JSON object, e.g. "
                                  '{"prompt": "a glass bottle", "seed": 7, "set": {"KSampler.steps": 20}}', EXIT_USAGE)
            unknown = sorted(set(spec) - set(JOB_KEYS))
            if unknown:
                raise ClientError(f"unknown key {', '.join(map(repr, unknown))}; a job has: {', '.join(JOB_KEYS)}",
                                  EXIT_USAGE)
            for key, kind in JOB_KEYS.items():
                if key in spec and (not isinstance(spec[key], kind) or isinstance(spec[key], bool)):
                    raise ClientError(f"{key!r} is {json.dumps(spec[key])}; it must be a JSON "
                                      f"{'string' if kind is str else 'integer' if kind is int else 'list or object'}",
                                      EXIT_USAGE)
            if "workflow" in spec:
                workflow_path = os.path.join(os.path.dirname(os.path.abspath(path)), spec["workflow"])
            elif defaults.workflow:
                workflow_path = defaults.workflow
            else:
                raise ClientError('no "workflow": give it in the line or as the WORKFLOW argument', EXIT_USAGE)
            if workflow_path not in workflows:
                workflows[workflow_path] = load_workflow(workflow_path)
            workflow = copy.deepcopy(workflows[workflow_path])
            given = {key: spec.get(key, getattr(defaults, key)) for key in ("prompt", "negative", "seed", "width",
                                                                            "height", "batch")}
            apply_overrides(workflow, **given, sets=[*defaults.set, *_job_sets(spec.get("set", []))])
            job_id = spec.get("id") or derived_job_id(workflow)
            if not JOB_ID.fullmatch(job_id):
                raise ClientError(f"id {job_id!r}: use letters, digits, '.', '_' and '-' (it names the job's "
                                  "output folder)", EXIT_USAGE)
            if job_id in lines_of:
                raise ClientError(f"the same job as line {lines_of[job_id]} (job id {job_id}); remove one, or give "
                                  'each its own "id"', EXIT_USAGE)
        except json.JSONDecodeError as error:
            raise ClientError(f"{where}: not JSON ({error.msg} at column {error.colno})", EXIT_USAGE) from error
        except ClientError as error:
            raise ClientError(f"{where}: {error}", error.exit_code) from error
        lines_of[job_id] = number
        jobs.append(Job(number, job_id, workflow_path, workflow, spec))
    if not jobs:
        raise ClientError(f"{path} holds no jobs (one JSON object a line)", EXIT_USAGE)
    return jobs


async def run_job(client: ComfyClient, job: Job, args: argparse.Namespace) -> list[str]:
    """Run `job` on `client`'s server; its images land in OUTPUT_DIR/<job id>/, which appears
    whole (renamed from a hidden partial folder) only once every image is there."""
    entry = await client.run(job.workflow, args.timeout, lambda message, prompt_id: progress_line(message, prompt_id)[0],
                             model_downloads(job.workflow_path))
    if entry.get("status", {}).get("status_str") != "success":
        raise ClientError(describe_failure(entry), EXIT_FAILED)
    partial = os.path.join(args.output_dir, f".{job.id}.partial")
    final = os.path.join(args.output_dir, job.id)
    try:
        shutil.rmtree(partial, ignore_errors=True)
        saved = await client.download(entry, partial, args.previews)
        prompt_id = (entry.get("prompt") or [None, None])[1]
        with open(os.path.join(partial, "job.json"), "w", encoding="utf-8") as handle:
            json.dump({"line": job.line, "job": job.spec, "server": client.server, "prompt_id": prompt_id}, handle,
                      indent=1)
        os.rename(partial, final)
    except OSError as error:
        raise ClientError(f"cannot write the images into {final}: {error}", EXIT_FAILED) from error
    return [os.path.join(final, os.path.basename(path)) for path in saved]


class BatchRun:
    """The jobs not yet done, spread over the servers: JOBS_PER_SERVER workers per server take jobs
    from one shared queue. A server that stops answering gives its jobs back to the queue and takes
    no more, so the others run them; a job that fails on a server that answers (rejected, execution
    error, timeout) is not retried."""

    def __init__(self, jobs: list[Job], args: argparse.Namespace):
        self.args = args
        self.outcomes: dict[str, Outcome] = {}
        for job in jobs:
            if os.path.isdir(os.path.join(args.output_dir, job.id)):
                self.outcomes[job.id] = Outcome(job, "skipped")
        self.jobs = jobs
        self.pending = [job for job in jobs if job.id not in self.outcomes]
        self.bar = tqdm(total=len(jobs), initial=len(jobs) - len(self.pending), unit="job", file=sys.stderr,
                        disable=args.quiet, dynamic_ncols=True)
        self.todo: asyncio.Queue = asyncio.Queue()
        self.gone: set[str] = set()
        self.workers = 0

    def write(self, text: str, file=sys.stderr) -> None:
        if file is sys.stdout or not self.args.quiet:
            self.bar.write(text, file=file)

    def finish(self, outcome: Outcome) -> None:
        self.outcomes[outcome.job.id] = outcome
        self.bar.update(1)
        if outcome.state == "failed":  # an error: shown also with --quiet
            self.bar.write(f"failed line {outcome.job.line} ({outcome.job.id}): {outcome.detail.splitlines()[0]}",
                           file=sys.stderr)
        if len(self.outcomes) == len(self.jobs):
            for _ in range(self.workers):
                self.todo.put_nowait(None)  # every worker stops

    async def run(self, clients: list[ComfyClient]) -> None:
        for job in self.pending:
            self.todo.put_nowait(job)
        self.workers = len(clients) * JOBS_PER_SERVER
        await asyncio.gather(*(self.worker(client) for client in clients for _ in range(JOBS_PER_SERVER)))
        while not self.todo.empty():
            job = self.todo.get_nowait()
            if job is not None:
                self.finish(Outcome(job, "failed", "every server went away before it ran; start them and rerun the "
                                                   "same command to resume"))

    async def worker(self, client: ComfyClient) -> None:
        while True:
            job = await self.todo.get()
            if job is None:
                return
            if client.server in self.gone:
                self.todo.put_nowait(job)
                return
            try:
                saved = await run_job(client, job, self.args)
            except ClientError as error:
                if error.exit_code != EXIT_UNREACHABLE:
                    self.finish(Outcome(job, "failed", str(error)))
                    continue
                if client.server not in self.gone:
                    self.gone.add(client.server)
                    self.write(f"{client.server} went away ({error.__cause__ or error}); its jobs go to the other servers")
                self.todo.put_nowait(job)
                return
            for path in saved:
                self.write(path, file=sys.stdout)
            self.finish(Outcome(job, "done", client.server))

    def summary(self) -> str:
        counts = {state: [o for o in self.outcomes.values() if o.state == state] for state in ("done", "failed", "skipped")}
        not_run = len(self.jobs) - len(self.outcomes)
        lines = [f"{len(self.jobs)} jobs: {len(counts['done'])} done, {len(counts['failed'])} failed, "
                 f"{len(counts['skipped'])} skipped (already in {self.args.output_dir})"
                 + (f", {not_run} not run" if not_run else "")]
        for outcome in sorted(counts["failed"], key=lambda o: o.job.line):
            reason = outcome.detail.replace("\n", "\n    ")
            lines.append(f"  failed: line {outcome.job.line} ({outcome.job.id}): {reason}")
        return "\n".join(lines)


async def run_batch(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    jobs = read_jobs(args.jobs, args)
    os.makedirs(args.output_dir, exist_ok=True)
    batch = BatchRun(jobs, args)
    try:
        if batch.pending:
            async with aiohttp.ClientSession() as session:
                clients = [ComfyClient(server, session, lambda message: None) for server in args.server]
                answers = await asyncio.gather(*(client.check_server() for client in clients), return_exceptions=True)
                for answer in answers:
                    if isinstance(answer, BaseException) and not isinstance(answer, ClientError):
                        raise answer
                reachable = [client for client, answer in zip(clients, answers) if not isinstance(answer, ClientError)]
                if not reachable:
                    raise answers[0]
                for answer in answers:
                    if isinstance(answer, ClientError):
                        batch.write(f"skipping a server: {answer}")
                await batch.run(reachable)
    except asyncio.CancelledError:
        batch.bar.close()
        log(batch.summary())
        log("interrupted: rerun the same command to resume (finished jobs are skipped); prompts already queued may "
            "still run in ComfyUI")
        raise
    finally:
        batch.bar.close()
    log(batch.summary())
    return EXIT_FAILED if any(o.state == "failed" for o in batch.outcomes.values()) else EXIT_OK


# --- command line -----------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Queue API-format ComfyUI workflows, follow their progress and download the images they save.")
    parser.add_argument("workflow", nargs="?",
                        help="API-format workflow JSON (e.g. workflows/api/sd15_transparent_fg_attn.json); with "
                             "--jobs, the workflow of the lines that name none")
    parser.add_argument("--jobs", metavar="FILE",
                        help="run a batch: one JSON object a line with any of id, workflow, prompt, negative, seed, "
                             "width, height, batch, set (e.g. {\"prompt\": \"a cat\", \"seed\": 3, \"set\": "
                             "{\"KSampler.steps\": 20}}); the other options are every job's defaults. Each job's "
                             "images go to OUTPUT_DIR/<job id>/; jobs whose folder exists are skipped")
    parser.add_argument("--server", action="append",
                        help=f"ComfyUI address (default {DEFAULT_SERVER}); repeat it to spread --jobs over servers")
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
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds to wait for each prompt's result (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print only the saved file paths and errors")
    args = parser.parse_args(argv)
    args.server = args.server or [DEFAULT_SERVER]
    return args


async def run_one(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    if not args.workflow:
        raise ClientError("give a WORKFLOW file to queue, or --jobs FILE", EXIT_USAGE)
    if len(args.server) > 1:
        raise ClientError(f"--server is given {len(args.server)} times: spreading over servers needs --jobs FILE",
                          EXIT_USAGE)
    workflow = load_workflow(args.workflow)
    for change in apply_overrides(workflow, prompt=args.prompt, negative=args.negative, seed=args.seed,
                                  width=args.width, height=args.height, batch=args.batch, sets=args.set):
        log(f"set {change}")

    def report(message: dict, prompt_id: Optional[str]) -> bool:
        ended, line = progress_line(message, prompt_id)
        if line is not None:
            log(line)
        return ended

    async with aiohttp.ClientSession() as session:
        client = ComfyClient(args.server[0], session, log)
        await client.check_server()
        entry = await client.run(workflow, args.timeout, report, model_downloads(args.workflow))
        if entry.get("status", {}).get("status_str") != "success":
            raise ClientError(describe_failure(entry), EXIT_FAILED)
        saved = await client.download(entry, args.output_dir, args.previews)
    if not saved:
        log("the workflow finished but saved no images")
    for path in saved:
        print(path)
    return EXIT_OK


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        return asyncio.run(run_batch(args, log) if args.jobs else run_one(args, log))
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        if not args.jobs:
            print("interrupted (the prompt may still be running in ComfyUI)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
