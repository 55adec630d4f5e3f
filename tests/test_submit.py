"""`actdistill submit`: a job validated locally, run on a real Ray head through the job API, status as exit code."""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.infra import stack, submit

pytestmark = pytest.mark.timeout(900)

TINY_COLLECT = ["collect.tasks=[reach-v3]", "collect.episodes_per_task=1", "collect.max_steps=20",
                "collect.keep_failed=true"]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A `ray start --head` on 127.0.0.1 with its job server; every process it started is stopped after."""
    folder = tmp_path_factory.mktemp("head")
    stack_id = f"test-submit-{uuid.uuid4().hex[:8]}"
    info = {}
    try:
        info = stack.start_ray_head(folder, stack_id, stack.free_port(), stack.free_port(), num_cpus=2)
        yield info
    finally:
        stack.stop_processes(stack_id)
        assert stack.stack_pids(stack_id) == []
        shutil.rmtree(info.get("temp_dir", folder / "none"), ignore_errors=True)


def _submit(head, *args):
    env = {**os.environ, "MUJOCO_GL": "egl"}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    if head["auth_mode"] == "token":
        env["RAY_AUTH_MODE"] = "token"
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", *args, "--address", head["dashboard_url"]],
                          check=False, capture_output=True, text=True, env=env, timeout=600, cwd=submit.REPO_ROOT)


@pytest.mark.slow
def test_collect_job_succeeds_on_the_cluster_and_writes_shards(ray_head, tmp_path):
    run_dir = tmp_path / "run"  # absolute: the job runs in a copy of the project
    result = _submit(ray_head, "collect", "--config", "jobs/configs/smoke.yaml", *TINY_COLLECT,
                     f"run.run_dir={run_dir}")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "SUCCEEDED" in result.stdout
    assert "wrote 1 episodes" in result.stdout  # the job's own log, streamed back
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    assert manifest["num_episodes"] == 1
    assert list((run_dir / "shards").glob("*.parquet"))


@pytest.mark.slow
def test_failed_job_returns_1(ray_head, tmp_path):
    # /proc is not writable: the job starts, fails creating its run folder, and reports FAILED.
    result = _submit(ray_head, "collect", "--config", "jobs/configs/smoke.yaml", *TINY_COLLECT,
                     "run.run_dir=/proc/actdistill-run")
    assert result.returncode == 1, (result.stdout[-3000:], result.stderr[-3000:])
    assert "FAILED" in result.stdout


def test_bad_config_fails_before_contacting_any_cluster(capsys):
    # Port 9 (discard) has no job server: reaching it would be a different error.
    code = submit.main(["distill", "--config", "jobs/configs/smoke.yaml", "router.budget=1.4",
                        "--address", "http://127.0.0.1:9"])
    assert code == 2
    assert "router.budget=1.4" in capsys.readouterr().err


def test_config_outside_the_project_is_refused(tmp_path, capsys):
    outside = tmp_path / "mine.yaml"
    shutil.copy(Path(submit.REPO_ROOT) / "jobs" / "configs" / "smoke.yaml", outside)
    code = submit.main(["collect", "--config", str(outside), "--address", "http://127.0.0.1:9"])
    assert code == 2
    assert "outside the project folder" in capsys.readouterr().err


def test_entrypoint_is_the_job_module_with_quoted_overrides():
    cmd = submit.entrypoint("train-teacher", "jobs/configs/smoke.yaml", ["collect.tasks=[reach-v3, push-v3]"])
    assert cmd == "python -m jobs.train_teacher --config jobs/configs/smoke.yaml 'collect.tasks=[reach-v3, push-v3]'"
