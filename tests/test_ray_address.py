"""Which Ray a job uses: a config that means local starts its own, whatever `ray start` left on the machine;
a config that names a cluster joins it, or fails in seconds naming the address."""

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pipeline.infra import stack
from pipeline.ray_runtime import check_reachable

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "configs" / "smoke.yaml"
ACTDISTILL = str(Path(sys.executable).parent / "actdistill")
# One short expert episode: the point is which Ray the job starts or joins, not the data.
TINY = ["collect.tasks=[reach-v3]", "collect.episodes_per_task=1", "collect.max_steps=10", "collect.image_size=32",
        "collect.keep_failed=true"]
# What start_ray logs (Ray's own INFO lines are off unless run.verbose).
STARTED_OWN, JOINED = "started a local Ray instance (GCS ", "connecting to the Ray cluster at "


def _dead_port():
    port = stack.free_port()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    return port


def test_an_address_where_nothing_answers_fails_in_seconds_naming_it():
    port = _dead_port()
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"no Ray cluster answers at 127\.0\.0\.1:{port} .*ray start --head"):
        check_reachable(f"127.0.0.1:{port}", timeout=2.0)
    assert time.monotonic() - started < 5
    with pytest.raises(ConnectionError, match=f"ray://127.0.0.1:{port}"):
        check_reachable(f"ray://127.0.0.1:{port}", timeout=2.0)
    with pytest.raises(ValueError, match="'my-head' .*is not HOST:PORT"):
        check_reachable("my-head")


def _collect(ray_tmpdir, run_dir, *extra, auth_mode="disabled", timeout=300):
    """`actdistill collect` as a user runs it, with Ray's temp folder where `ray start` recorded its head."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=str(ray_tmpdir), MUJOCO_GL="egl")
    if auth_mode == "token":   # Ray 2.60 heads require the token when ~/.ray/auth_token exists
        env["RAY_AUTH_MODE"] = "token"
    # One MLflow store for the test's jobs: a fresh sqlite store costs each job ~4 s of table creation.
    tracking = f"tracking.tracking_uri=sqlite:///{Path(run_dir).parent / 'mlflow.db'}"
    return subprocess.run([ACTDISTILL, "collect", "--config", str(SMOKE), f"run.run_dir={run_dir}", tracking, *TINY,
                           *extra], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_local_jobs_beside_a_live_and_a_dead_ray_start_head(tmp_path):
    stack_id = f"test-address-{uuid.uuid4().hex[:8]}"
    head = stack.start_ray_head(tmp_path, stack_id, stack.free_port(), stack.free_port(), num_cpus=2)
    # What a user's default `ray start --head` leaves: the head's record in <Ray temp folder>/ray.
    ray_tmpdir = Path(head["temp_dir"] + "-user")
    ray_tmpdir.mkdir()
    (ray_tmpdir / "ray").symlink_to(head["temp_dir"])
    record = ray_tmpdir / "ray" / "ray_current_cluster"
    try:
        assert record.read_text().strip() == head["gcs_address"]
        live = _collect(ray_tmpdir, tmp_path / "live")
        assert live.returncode == 0, live.stderr[-3000:]
        assert STARTED_OWN in live.stderr and JOINED not in live.stderr
        assert f"{STARTED_OWN}{head['gcs_address']}" not in live.stderr   # its own, not the head's

        named = _collect(ray_tmpdir, tmp_path / "named", f"run.ray_address={head['gcs_address']}",
                         auth_mode=head["auth_mode"])
        assert named.returncode == 0, named.stderr[-3000:]
        assert f"{JOINED}{head['gcs_address']}" in named.stderr and STARTED_OWN not in named.stderr

        stack.stop_processes(stack_id)   # the head dies without `ray stop`: its record stays behind
        assert stack.stack_pids(stack_id) == [] and record.read_text().strip() == head["gcs_address"]
        dead = _collect(ray_tmpdir, tmp_path / "dead")
        assert dead.returncode == 0, dead.stderr[-3000:]
        assert STARTED_OWN in dead.stderr

        started = time.monotonic()
        gone = _collect(ray_tmpdir, tmp_path / "gone", f"run.ray_address={head['gcs_address']}", timeout=120)
        assert gone.returncode != 0 and f"no Ray cluster answers at {head['gcs_address']}" in gone.stderr
        assert time.monotonic() - started < 60   # interpreter and imports included; Ray alone waits minutes
    finally:
        stack.stop_processes(stack_id)
        for folder in (ray_tmpdir, Path(head["temp_dir"])):
            shutil.rmtree(folder, ignore_errors=True)
