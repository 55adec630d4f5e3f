"""The MLflow tracking server goes away: training neither dies nor waits on it, the metrics logged meanwhile reach
the server once it is back (none lost), and a server that stays away past tracking.outage_limit_s fails the stage
with a message naming the tracking URI. A real `mlflow server` on 127.0.0.1, stopped and restarted on its port."""

import json
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from fault_support import NORMALIZER, SMOKE, TINY, in_thread, teacher_and_probes
from mlflow.tracking import MlflowClient

from jobs import distill as distill_job
from pipeline.config import load_config
from pipeline.infra.stack import _wait_http, free_port, start_mlflow, stop_group
from pipeline.models.checkpoint import PolicyCard, save_policy
from pipeline.models.vla import VLA, teacher_config
from pipeline.ray_runtime import start_ray
from pipeline.tracking.metrics import MetricSender, TrackingOutage
from pipeline.train.driver import worker_causes

pytestmark = pytest.mark.slow


class Server:
    """One `mlflow server` (sqlite + local artifacts) that can be stopped and started again on the same port."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.id = folder, free_port(), uuid.uuid4().hex[:8]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc, state = start_mlflow(self.folder, f"outage-{self.id}", self.port)
        _wait_http("mlflow", f"{self.url}/health", Path(state["log"]), self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    server = Server(tmp_path / "mlflow")
    server.start()
    yield server
    server.stop()


def test_metrics_wait_out_an_outage_and_a_longer_one_is_named(mlflow_server):
    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment("sender")).info.run_id
    sender = MetricSender(mlflow_server.url, run_id, outage_limit_s=30, retry_s=0.5)
    sender.log({"loss": 1.0}, 1)
    mlflow_server.stop()
    started = time.monotonic()
    for step in range(2, 6):
        sender.log({"loss": float(step)}, step)   # queued: never waits for the server
    queued_in = time.monotonic() - started
    time.sleep(3)
    assert sender.failed_attempts >= 1
    mlflow_server.start()
    sender.close()
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(1, 6)]
    assert queued_in < 1.0   # MLflow's own retries would have held each call for minutes

    # Away past the limit: the next log names the server, the limit and what is unsent; credentials are kept out.
    secret = "user:s3cr3t-token@"
    sender = MetricSender(mlflow_server.url.replace("://", f"://{secret}"), run_id, outage_limit_s=2, retry_s=0.5)
    mlflow_server.stop()
    sender.log({"loss": 9.0}, 9)
    time.sleep(2.5)
    with pytest.raises(TrackingOutage) as err:
        sender.log({"loss": 10.0}, 10)
    message = str(err.value)
    assert mlflow_server.url in message and "tracking.outage_limit_s=2" in message and "--resume" in message
    assert "s3cr3t" not in message


def _distill_config(tmp_path, shards, server, steps, extra=()):
    overrides = TINY + [f"run.run_dir={tmp_path / 'run'}", f"data.shards_uri={shards}",
                        f"tracking.tracking_uri={server.url}", "distill.teacher_mode=online", "distill.eval_every=0",
                        f"distill.train.steps={steps}", "distill.train.batch_size=8", "distill.train.log_every=1",
                        "distill.train.checkpoint_every=20", "distill.train.ledger=true", "distill.train.num_workers=1",
                        *extra]
    cfg = load_config(SMOKE, overrides)
    teacher_and_probes(cfg)
    return cfg


def _ledger_steps(run_dir):
    lines = [line for p in (Path(run_dir) / "ray").glob("*/ledger/rank0.jsonl") for line in p.read_text().splitlines()]
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def _wait_for_step(run_dir, step, thread, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and thread.is_alive():
        if len(_ledger_steps(run_dir)) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the distill never reached step {step}")


def _distill_run(cfg):
    client = MlflowClient(cfg.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    (run,) = [r for r in runs if r.data.tags.get("stage") == "distill"]
    return client, run


def test_a_60s_tracking_outage_during_distill_blocks_no_step_and_loses_no_metric(shards, tmp_path, mlflow_server,
                                                                                 record_property):
    steps = 120
    cfg = _distill_config(tmp_path, shards, mlflow_server, steps)
    start_ray(cfg)   # in the main thread: Ray's head processes die with the thread that started them
    thread, outcome = in_thread(lambda: distill_job.main(cfg))
    _wait_for_step(tmp_path / "run", 3, thread)
    mlflow_server.stop()
    at_stop = len(_ledger_steps(tmp_path / "run"))
    time.sleep(60)
    during = len(_ledger_steps(tmp_path / "run")) - at_stop
    mlflow_server.start()
    back = time.monotonic()
    thread.join(timeout=900)
    assert "error" not in outcome, outcome.get("error")
    # bench/faults.py reads these from the JUnit report
    record_property("fault", "MLflow tracking server down 60 s during distill")
    record_property("outcome", f"training went on ({during} steps during the outage); every metric delivered")
    record_property("steps_lost", 0)
    record_property("rows_lost", 0)
    record_property("recover_s", round(time.monotonic() - back, 1))
    assert during > 0 or at_stop == steps   # training went on while the server was away (or had finished)
    client, run = _distill_run(cfg)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/total")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))   # every step's metrics, each once


def test_a_tracking_server_away_past_the_limit_fails_the_stage_naming_it(shards, tmp_path, mlflow_server,
                                                                        monkeypatch):
    # The driver marks its run FAILED through MLflow's own client: without retries it gives up at once.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = _distill_config(tmp_path, shards, mlflow_server, 2000, ["tracking.outage_limit_s=10"])
    start_ray(cfg)
    thread, outcome = in_thread(lambda: distill_job.main(cfg))
    _wait_for_step(tmp_path / "run", 3, thread)
    mlflow_server.stop()
    thread.join(timeout=600)
    error = str(outcome.get("error"))
    assert f"the MLflow tracking server {mlflow_server.url} has taken no metrics" in error, error
    assert "tracking.outage_limit_s=10" in error and "--resume" in error
    assert max(_ledger_steps(tmp_path / "run")) < 2000   # it stopped: it did not train on blind to the end


def test_promote_registers_through_an_outage_once_with_every_tag(tmp_path, mlflow_server, monkeypatch):
    import mlflow

    from pipeline.models.checkpoint import read_policy_config
    from pipeline.models.student import derive_student
    from pipeline.tracking.registry import find_or_register
    from pipeline.tune.trials import TrialResult

    # MLflow's own per-request retries off, so that our retry loop is what carries the registration through.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = load_config(SMOKE, TINY + [f"run.run_dir={tmp_path / 'run'}"])
    torch.manual_seed(0)
    student = derive_student(VLA(teacher_config(cfg.model, [32, 32, 3], 4, 4)), 8)
    uri = str(tmp_path / "student")
    save_policy(student, uri, PolicyCard(normalizer=NORMALIZER))
    candidate = TrialResult(trial="t0", params={}, student_uri=uri, success=0.9, compute_ratio=0.5,
                            action_mse_norm=0.1)
    evidence = {"student_hash": read_policy_config(uri).hash, "success": "0.9", "compute_ratio": "0.5",
                "action_mse_norm": "0.1"}
    # This process's MLflow URIs (module globals and the env vars MLflow mirrors them in) are restored after the test.
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    mlflow.set_experiment("promote-outage")
    with mlflow.start_run():
        mlflow_server.stop()
        back = threading.Timer(20, mlflow_server.start)
        back.start()
        version = find_or_register("outage-model", candidate, evidence, limit_s=300, retry_s=1)
        back.join()
        again = find_or_register("outage-model", candidate, evidence, limit_s=300, retry_s=1)
    client = MlflowClient(mlflow_server.url, registry_uri=mlflow_server.url)
    (only,) = client.search_model_versions("name='outage-model'")   # one version, registered once
    assert again.version == version.version == only.version
    assert {k: only.tags[k] for k in evidence} == evidence          # born with its evidence

    mlflow_server.stop()
    with pytest.raises(RuntimeError, match=rf"could not register outage-model at the MLflow tracking server "
                                           rf"{mlflow_server.url} .*outage_limit_s=3.*nothing was half registered"):
        find_or_register("outage-model", candidate, evidence, limit_s=3, retry_s=1)


def test_a_worker_errors_cause_reaches_the_user_whole_though_ray_truncates_its_traceback():
    # Ray keeps the first and last 500 characters of each worker's traceback in WorkerGroupError's message; a long
    # last error cut the tracking server's URI out of the middle of TrackingOutage's message on a loaded machine.
    from ray.train.v2.api.exceptions import WorkerGroupError

    outage = TrackingOutage("the MLflow tracking server http://127.0.0.1:5000 has taken no metrics for 10 s "
                            "(tracking.outage_limit_s=10): " + "x" * 900)
    truncated = "[Rank 0 Error Snippet]:\nTraceback ...\n... (Output truncated) ...\n" + str(outage)[-500:]
    error = WorkerGroupError(truncated, {1: outage, 0: outage})
    assert "http://127.0.0.1:5000" not in str(error)
    causes = worker_causes(error)
    assert causes == f"rank 0, 1: TrackingOutage: {outage}"     # one line per distinct error, every rank named
    assert worker_causes(RuntimeError("not a worker group's")) == ""
