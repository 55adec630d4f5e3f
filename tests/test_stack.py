"""`actdistill stack up|down`: a Ray head, MLflow and an S3 API answer on 127.0.0.1; `down` leaves no process."""

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline.infra import stack

pytestmark = pytest.mark.timeout(900)


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "stack", *args], check=False,
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def stack_dir(tmp_path):
    folder = tmp_path / "stack"
    try:
        yield folder
    finally:
        # Whatever the test did, stop every process carrying this stack's marker.
        if stack.state_path(folder).exists():
            state = json.loads(stack.state_path(folder).read_text())
            stack.stop_processes(state["stack_id"])
            shutil.rmtree(state["services"].get("ray", {}).get("temp_dir") or folder, ignore_errors=True)


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


@pytest.mark.slow
def test_up_serves_three_services_and_down_stops_every_process(stack_dir):
    up = _cli("up", "--dir", str(stack_dir), "--ray-port", "0", "--dashboard-port", "0", "--mlflow-port", "0",
              "--s3-port", "0", "--num-cpus", "1")
    assert up.returncode == 0, up.stderr[-3000:]
    state = json.loads(stack.state_path(stack_dir).read_text())
    env = state["env"]
    assert f"export RAY_ADDRESS={env['RAY_ADDRESS']}" in up.stdout
    assert f"export MLFLOW_TRACKING_URI={env['MLFLOW_TRACKING_URI']}" in up.stdout
    assert f"export AWS_ENDPOINT_URL={env['AWS_ENDPOINT_URL']}" in up.stdout
    pids = stack.stack_pids(state["stack_id"])
    assert state["services"]["mlflow"]["pid"] in pids and state["services"]["s3"]["pid"] in pids

    # Ray: the GCS port takes connections and the job API answers a client using only the exported env.
    gcs_port = int(env["RAY_ADDRESS"].rsplit(":", 1)[1])
    socket.create_connection(("127.0.0.1", gcs_port), timeout=10).close()
    assert _get(env["RAY_API_SERVER_ADDRESS"] + "/api/gcs_healthz")[0] == 200
    client_env = {**os.environ, **env}
    list_jobs = "from ray.job_submission import JobSubmissionClient as C; print(len(C().list_jobs()))"
    jobs = subprocess.run([sys.executable, "-c", list_jobs], check=False, capture_output=True, text=True,
                          env=client_env, timeout=120)
    assert jobs.returncode == 0 and jobs.stdout.strip() == "0", jobs.stderr[-2000:]
    # `actdistill submit` with no address and a clean environment finds the head through the state file.
    bare_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    via_state = ("from pipeline.infra.submit import resolve_address as r; "
                 "from ray.job_submission import JobSubmissionClient as C; "
                 f"print(len(C(r(None, {str(stack_dir)!r})).list_jobs()))")
    found = subprocess.run([sys.executable, "-c", via_state],
                           check=False, capture_output=True, text=True, env=bare_env, timeout=120)
    assert found.returncode == 0 and found.stdout.strip() == "0", found.stderr[-2000:]

    # MLflow answers its health check; S3 takes a bucket through boto3 with the exported endpoint.
    assert _get(env["MLFLOW_TRACKING_URI"] + "/health") == (200, "OK")
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket="actdistill")
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["actdistill"]

    # A second `up` on the same folder refuses rather than starting a twin.
    again = _cli("up", "--dir", str(stack_dir), "--ray-port", "0", "--dashboard-port", "0", "--mlflow-port", "0",
                 "--s3-port", "0")
    assert again.returncode == 1 and "already running" in again.stderr

    down = _cli("down", "--dir", str(stack_dir))
    assert down.returncode == 0, down.stderr[-2000:]
    assert not any(Path(f"/proc/{pid}").exists() and stack._proc_is_live(pid) for pid in pids)
    assert stack.stack_pids(state["stack_id"]) == []
    assert not stack.state_path(stack_dir).exists()
    assert not Path(state["services"]["ray"]["temp_dir"]).exists()


@pytest.mark.slow
def test_busy_port_is_refused_with_the_flag_to_change(stack_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _cli("up", "--dir", str(stack_dir), "--mlflow-port", str(port), "--ray-port", "0",
                      "--dashboard-port", "0", "--s3-port", "0", timeout=120)
    assert result.returncode == 1
    assert f"--mlflow-port={port}: the port is in use" in result.stderr
    assert not stack.state_path(stack_dir).exists()


def test_down_without_a_stack_says_how_to_start_one(tmp_path):
    result = _cli("down", "--dir", str(tmp_path / "none"), timeout=120)
    assert result.returncode == 1 and "actdistill stack up" in result.stderr
