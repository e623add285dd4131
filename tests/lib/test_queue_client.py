"""workflows/queue_workflow.py, the command-line client, without a server: what it imports,
arguments and UI-format files refused before queueing, an unreachable server, the overrides on
every shipped workflow, progress messages, jobs files and resuming a batch."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from support.client import CLIENT, client_module, run_client
from support.net import free_port
from support.paths import API_DIR, PACK_ROOT, WORKFLOW_DIR
from support.workflows import api_workflow_names, load_api


def test_the_client_imports_only_the_standard_library_and_what_comfyui_installs():
    tree = ast.parse(CLIENT.read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    allowed = set(sys.stdlib_module_names) | {"aiohttp", "tqdm"}  # in every ComfyUI's requirements.txt
    assert modules - {"__future__"} <= allowed, modules - allowed


def test_unreachable_server(tmp_path):
    result = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--server", f"http://127.0.0.1:{free_port()}",
                        "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert "cannot reach ComfyUI at http://127.0.0.1:" in result.stderr and "Is it running?" in result.stderr
    assert not any(tmp_path.iterdir())


def test_ui_format_and_bad_arguments_are_refused_before_queueing(tmp_path):
    ui = run_client(str(WORKFLOW_DIR / "sd15_transparent_decode.json"), "--server", "http://127.0.0.1:9")
    assert ui.returncode == 1 and "UI-format workflow" in ui.stderr and "workflows/api/" in ui.stderr
    width = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--width", "100")
    assert width.returncode == 1 and "multiple of 8" in width.stderr
    joint = run_client(str(API_DIR / "sd15_joint_fg_bg_blend.json"), "--batch", "4")
    assert joint.returncode == 1 and "multiple of 3" in joint.stderr
    typo = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--set", "KSampler.stepz=3")
    assert typo.returncode == 1 and "has no input 'stepz'" in typo.stderr
    missing = run_client(str(tmp_path / "nope.json"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def _text_behind(module, workflow: dict, side: str) -> set[str]:
    return {workflow[module._text_node_behind(workflow, node["inputs"][side])]["inputs"]["text"]
            for node in workflow.values() if side in node["inputs"] and node["class_type"].startswith("KSampler")}


@pytest.mark.parametrize("name", [n for n in api_workflow_names() if n.startswith(("sd15_", "sdxl_", "flux_"))])
def test_overrides_reach_every_shipped_workflow(name):
    module = client_module()
    workflow = load_api(name)
    has_negative = bool(module.prompt_nodes(workflow, "negative"))
    sized = any("width" in n["inputs"] for n in workflow.values())
    batched = any("batch_size" in n["inputs"] for n in workflow.values())
    module.apply_overrides(workflow, prompt="P", negative="N" if has_negative else None, seed=99,
                           width=256 if sized else None, height=256 if sized else None, batch=6 if batched else None)
    assert _text_behind(module, workflow, "positive") == {"P"}
    if has_negative:
        assert _text_behind(module, workflow, "negative") == {"N"}
    seeds = [n["inputs"].get("seed", n["inputs"].get("noise_seed")) for n in workflow.values()
             if n["class_type"].startswith("KSampler")]
    assert seeds and set(seeds) == {99}
    shipped = load_api(name)
    for node_id, node in workflow.items():
        if isinstance(shipped[node_id]["inputs"].get("width"), list):  # linked to the one size: follows it
            assert node["inputs"]["width"] == shipped[node_id]["inputs"]["width"]
        elif node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage", "ImageScale"):
            assert (node["inputs"]["width"], node["inputs"]["height"]) == (256, 256)
        elif node["class_type"] == "LayeredDiffusionUpscaleRGBA":  # a fixed size follows, 0 (scale_by) stays
            before = shipped[node_id]["inputs"]
            assert node["inputs"]["width"] == (256 if before["width"] else 0)


def test_progress_messages():
    """What the websocket says about a prompt becomes a log line; its end ends the wait; other
    prompts' messages are ignored."""
    line = client_module().progress_line
    assert line({"type": "progress", "data": {"node": "5", "value": 2, "max": 4, "prompt_id": "p"}}, "p") == (
        False, "  node 5: 2/4")
    assert line({"type": "executing", "data": {"node": "7", "prompt_id": "p"}}, "p") == (False, "running node 7")
    assert line({"type": "execution_success", "data": {"prompt_id": "p"}}, "p") == (True, None)
    assert line({"type": "execution_error", "data": {"prompt_id": "q"}}, "p") == (False, None)
    assert line({"type": "status", "data": {"status": {}}}, "p") == (False, None)


def test_default_output_folder_is_outside_the_pack():
    output = Path(client_module().parse_args(["workflow.json"]).output_dir).resolve()
    assert PACK_ROOT not in output.parents and output != PACK_ROOT
    assert output == (Path.home() / "layerdiffuse_output").resolve()


def test_model_links_come_from_the_ui_twin(tmp_path):
    downloads = client_module().model_downloads(str(API_DIR / "sd15_transparent_fg_attn.json"))
    checkpoint = downloads["v1-5-pruned-emaonly-fp16.safetensors"]
    assert checkpoint["directory"] == "checkpoints" and checkpoint["url"].startswith("https://huggingface.co/")
    assert downloads["layer_sd15_transparent_attn.safetensors"]["directory"] == "layer_model"
    assert client_module().model_downloads(str(tmp_path / "nowhere.json")) == {}


def _jobs_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _read_jobs(path: Path, *options: str):
    module = client_module()
    return module.read_jobs(str(path), module.parse_args([str(API_DIR / "sd15_transparent_decode.json"), *options]))


def test_a_jobs_file_sets_each_job_over_the_command_line_defaults(tmp_path):
    path = _jobs_file(tmp_path,
                      '{"prompt": "a red apple", "seed": 1, "set": {"KSampler.steps": 3}}',
                      "",
                      "# a comment",
                      '{"prompt": "a red apple", "seed": 2, "set": ["KSampler.steps=4"], "negative": "dark"}',
                      '{"id": "mine", "workflow": "decode.json"}')
    (tmp_path / "decode.json").write_text((API_DIR / "sd15_transparent_decode.json").read_text())
    jobs = _read_jobs(path, "--seed", "9", "--set", "KSampler.steps=2", "--negative", "blurry")
    assert [job.line for job in jobs] == [1, 4, 5]
    first, second, third = (job.workflow for job in jobs)
    assert (first["2"]["inputs"]["text"], first["3"]["inputs"]["text"]) == ("a red apple", "blurry")
    assert (first["5"]["inputs"]["seed"], first["5"]["inputs"]["steps"]) == (1, 3)
    assert (second["5"]["inputs"]["seed"], second["5"]["inputs"]["steps"], second["3"]["inputs"]["text"]) == (2, 4, "dark")
    assert (third["5"]["inputs"]["seed"], third["5"]["inputs"]["steps"]) == (9, 2)
    assert jobs[2].workflow_path == str(tmp_path / "decode.json") and jobs[2].id == "mine"
    # Ids: the prompt as a folder name and a digest of the queued workflow, the same on every read.
    assert jobs[0].id.startswith("a-red-apple-") and jobs[0].id != jobs[1].id
    assert [job.id for job in _read_jobs(path, "--seed", "9", "--set", "KSampler.steps=2", "--negative", "blurry")] == [
        job.id for job in jobs]
    assert _read_jobs(path, "--seed", "9", "--set", "KSampler.steps=5")[2].id == "mine"
    assert _read_jobs(path, "--seed", "9", "--set", "KSampler.steps=5")[0].id != jobs[0].id


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "seeds": 3}', "line 1: unknown key 'seeds'; a job has: id, workflow, prompt"),
    ('{"prompt": "x", "seed": "3"}', "line 1: 'seed' is \"3\"; it must be a JSON integer"),
    ('{"prompt": "x"', "line 1: not JSON"),
    ('["x"]', "line 1: a job is one JSON object"),
    ('{"width": 100}', "line 1: --width 100: use a multiple of 8"),
    ('{"set": {"KSampler.stepz": 3}}', "line 1: --set 'KSampler.stepz=3': node 5 (KSampler) has no input 'stepz'"),
    ('{"id": "../up"}', "line 1: id '../up': use letters, digits"),
    ('{"workflow": "nope.json"}', "line 1: cannot read"),
])
def test_a_bad_job_line_is_named_before_anything_is_queued(tmp_path, line, message):
    result = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--jobs", str(_jobs_file(tmp_path, line)),
                        "--server", "http://127.0.0.1:9", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_the_same_job_twice_is_refused(tmp_path):
    path = _jobs_file(tmp_path, '{"prompt": "x", "seed": 1}', '{"seed": 1, "prompt": "x"}')
    result = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--jobs", str(path))
    assert result.returncode == 1, result.stderr
    assert "line 2: the same job as line 1" in result.stderr and 'give each its own "id"' in result.stderr


def test_jobs_whose_folder_exists_are_skipped_without_a_server(tmp_path):
    """Resuming: a job counts as done when its output folder exists (written whole, by a rename,
    once every image is in); a run with nothing left to do needs no server."""
    path = _jobs_file(tmp_path, '{"prompt": "a", "seed": 1}', '{"prompt": "b", "seed": 2}')
    out = tmp_path / "out"
    for job in _read_jobs(path):
        (out / job.id).mkdir(parents=True)
    dead = f"http://127.0.0.1:{free_port()}"
    args = (str(API_DIR / "sd15_transparent_decode.json"), "--jobs", str(path), "--output-dir", str(out))
    result = run_client(*args, "--server", dead)
    assert result.returncode == 0, result.stderr
    assert f"2 jobs: 0 done, 0 failed, 2 skipped (already in {out})" in result.stderr
    (out / _read_jobs(path)[1].id).rmdir()
    (out / f".{_read_jobs(path)[1].id}.partial").mkdir()  # what a crash mid-download leaves: not done
    result = run_client(*args, "--server", dead, "--server", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "cannot reach ComfyUI at http://127.0.0.1:" in result.stderr, result.stderr


def test_one_job_goes_to_one_server_and_a_batch_names_its_workflow(tmp_path):
    result = run_client(str(API_DIR / "sd15_transparent_decode.json"), "--server", "a:1", "--server", "b:1")
    assert result.returncode == 1 and "spreading over servers needs --jobs FILE" in result.stderr
    nothing = run_client("--server", "a:1")
    assert nothing.returncode == 1 and "give a WORKFLOW file to queue, or --jobs FILE" in nothing.stderr
    no_workflow = run_client("--jobs", str(_jobs_file(tmp_path, '{"prompt": "x"}')))
    assert no_workflow.returncode == 1 and 'line 1: no "workflow"' in no_workflow.stderr
