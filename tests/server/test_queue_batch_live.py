"""workflows/queue_workflow.py --jobs, run as users run it, over live servers: a batch spread over
two servers with one killed midway (its jobs go to the other, every job done once), and a rerun
that skips the jobs already done and reports the ones that fail."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from support.client import CLIENT, client_module, run_client
from support.environment import find_comfyui, unavailable
from support.net import free_port
from support.paths import API_DIR
from support.server import ServerError, link_into, make_base, start
from support.synth import synthetic_file

TEST_CHECKPOINT = "sd15_synthetic.safetensors"
WORKFLOW = str(API_DIR / "sd15_transparent_decode.json")
# Every job: the synthetic checkpoint, one step and one decoder pass at 64 px.
JOB_OPTIONS = ("--set", f"CheckpointLoaderSimple.ckpt_name={TEST_CHECKPOINT}", "--set", "KSampler.steps=1",
               "--set", 'LayeredDiffusionDecodeRGBA.passes="1"',
               "--width", "64", "--height", "64")


@pytest.fixture
def second_server(tmp_path_factory):
    """A second live ComfyUI with its own base directory (its own output folder), for one test
    that kills it."""
    comfy, reason = find_comfyui()
    if comfy is None:
        unavailable(reason)
    base = make_base(tmp_path_factory.mktemp("second_base"))
    link_into(base, "checkpoints", synthetic_file("sd15_checkpoint"), TEST_CHECKPOINT)
    link_into(base, "layer_model", synthetic_file("layer_sd15_vae_transparent_decoder"))
    try:
        server = start(comfy, base)
    except ServerError as error:
        pytest.fail(str(error))
    yield server
    if server.process.poll() is None:
        server.stop()


def _jobs(tmp_path: Path, specs: list[dict]) -> Path:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(spec) + "\n" for spec in specs))
    return path


def _done(out: Path) -> dict[str, dict]:
    """job id -> its job.json, for each finished job folder."""
    return {folder.name: json.loads((folder / "job.json").read_text())
            for folder in out.iterdir() if folder.is_dir() and not folder.name.startswith(".")}


def test_a_batch_over_two_servers_survives_one_killed_midway(comfy_server, second_server, tmp_path):
    specs = [{"prompt": f"a glass bottle number {n}", "seed": n} for n in range(20)]
    jobs_file, out = _jobs(tmp_path, specs), tmp_path / "out"
    command = [sys.executable, "-I", str(CLIENT), WORKFLOW, "--jobs", str(jobs_file), *JOB_OPTIONS,
               "--server", comfy_server.url, "--server", second_server.url, "--output-dir", str(out)]
    client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and client.poll() is None:
            servers = Counter(job["server"] for job in _done(out).values()) if out.is_dir() else Counter()
            if servers[second_server.url] >= 2:
                break
            time.sleep(0.2)
        done_before_kill = len(_done(out))
        assert client.poll() is None and done_before_kill < 16, "the batch ended before the kill"
        second_server.process.kill()
        stdout, stderr = client.communicate(timeout=600)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, stderr
    assert f"{second_server.url} went away" in stderr and "its jobs go to the other servers" in stderr
    assert "20 jobs: 20 done, 0 failed, 0 skipped" in stderr and "20/20" in stderr, stderr  # the bar's end
    # Every job once: one folder per job, with its one image, and nothing half-written left.
    module = client_module()
    ids = [job.id for job in module.read_jobs(str(jobs_file), module.parse_args([WORKFLOW, *JOB_OPTIONS]))]
    done = _done(out)
    assert sorted(done) == sorted(ids) and sorted(p.name for p in out.iterdir()) == sorted(ids)
    for job_id, record in done.items():
        images = sorted(p.name for p in (out / job_id).iterdir() if p.suffix == ".png")
        assert len(images) == 1, (job_id, images)
    saved = stdout.split()
    assert len(saved) == 20 == len(set(saved)) and all(Path(p).is_file() for p in saved)
    by_server = Counter(record["server"] for record in done.values())
    assert by_server[second_server.url] >= 2 and by_server[comfy_server.url] + by_server[second_server.url] == 20
    # The surviving server ran its jobs with each line's own seed and prompt.
    for record in done.values():
        if record["server"] == comfy_server.url:
            queued = comfy_server.get(f"/history/{record['prompt_id']}")[record["prompt_id"]]["prompt"][2]
            assert queued["5"]["inputs"]["seed"] == record["job"]["seed"]
            assert queued["2"]["inputs"]["text"] == record["job"]["prompt"]


def test_a_rerun_skips_done_jobs_and_summarises_failures(comfy_server, tmp_path):
    specs = [{"prompt": "a red apple", "seed": 1}, {"id": "pear", "prompt": "a pear", "seed": 2}]
    out = tmp_path / "out"
    args = [WORKFLOW, *JOB_OPTIONS, "--server", comfy_server.url, "--output-dir", str(out)]
    first = run_client(*args, "--jobs", str(_jobs(tmp_path, specs)))
    assert first.returncode == 0, first.stderr
    assert "2 jobs: 2 done, 0 failed, 0 skipped" in first.stderr
    assert (out / "pear" / "job.json").is_file() and len(_done(out)) == 2
    specs += [{"prompt": "a plum", "seed": 3},
              {"prompt": "a fig", "set": {"LayeredDiffusionDecodeRGBA.sd_version": "SD3"}}]
    dead = f"http://127.0.0.1:{free_port()}"
    second = run_client(*args, "--server", dead, "--jobs", str(_jobs(tmp_path, specs)))
    assert second.returncode == 4, second.stderr
    assert "4 jobs: 1 done, 1 failed, 2 skipped" in second.stderr, second.stderr
    assert f"skipping a server: cannot reach ComfyUI at {dead}" in second.stderr
    assert "failed: line 4 (a-fig-" in second.stderr and "ComfyUI rejected the workflow" in second.stderr
    assert "sd_version" in second.stderr and len(second.stdout.split()) == 1
    assert len(_done(out)) == 3
