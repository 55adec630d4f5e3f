"""Promotion against a real `mlflow server` on 127.0.0.1: the gate, aliases, idempotency, serving."""

import json
import os
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from jobs import promote
from pipeline.config import load_config
from pipeline.evaluate.policy import Policy
from pipeline.evaluate.report import EvaluationReport, PolicyReport
from pipeline.infra.stack import free_port, stop_group
from pipeline.models.checkpoint import PolicyCard, save_policy
from pipeline.models.student import derive_student
from pipeline.models.vla import VLA, VLAConfig
from pipeline.stages import RunPaths
from pipeline.tracking.registry import register_student, set_aliases
from pipeline.tune.trials import SweepSummary, TrialResult

pytestmark = pytest.mark.slow   # an MLflow server and `mlflow models serve`

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NAME = "registry-test-student"
NORMALIZER = {"action_mean": [0.0] * 4, "action_std": [1.0] * 4, "proprio_mean": [0.0] * 4,
              "proprio_std": [1.0] * 4}


def _wait_http(url: str, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):   # not up yet, or busy starting
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/health", proc)
        yield url
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def run(tmp_path_factory, mlflow_server):
    """A run folder holding a real tiny teacher; students and their results are added per round."""
    run_dir = tmp_path_factory.mktemp("promote") / "run"
    cfg = load_config(REPO / "jobs" / "configs" / "smoke.yaml",
                      [f"run.run_dir={run_dir}", f"tracking.tracking_uri={mlflow_server}",
                       f"promote.model_name={NAME}", "promote.success_delta=0.05", "promote.compute_budget=0.6"])
    torch.manual_seed(0)
    teacher = VLA(VLAConfig(backbone="llama", hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                            intermediate_size=64, vocab_size=64, max_instruction_tokens=6, image_size=32,
                            patch_size=8, proprio_dim=4, action_dim=4))
    teacher_hash = save_policy(teacher, str(RunPaths.of(cfg).teacher),
                               PolicyCard(normalizer=NORMALIZER, data_content_hash="data123"))
    return cfg, teacher, teacher_hash


def _evaluated(success, executed, action_mse, episodes):
    """A policy's evaluation block: the figures promote reads, the rest filled in plausibly."""
    return PolicyReport(success=success, episodes=episodes, ci95=(0.0, 1.0), per_task={}, executed_fraction=executed,
                        layer_frequency=[executed] * 4, flops={"backbone": executed, "total": 1.0},
                        action_mse_norm=action_mse, action_mse_raw=action_mse, heldout_rows=10.0,
                        latency_ms_median=1.0, latency_ms_p90=1.0)


def _round(cfg, teacher, teacher_hash, results: dict[str, tuple[float, float]]) -> None:
    """Write students (distinct real weights) and the evaluate/sweep results promote reads. Every figure is
    on the teacher's episodes and seeds, so promote gates them as they are (no closed-loop re-evaluation)."""
    paths, trials = RunPaths.of(cfg), []
    count, first = cfg.evaluate.episodes_per_task, cfg.evaluate.seed
    for i, (name, (success, compute)) in enumerate(results.items()):
        torch.manual_seed(zlib.crc32(name.encode()))
        uri = str(paths.sweep / name / "student")
        save_policy(derive_student(teacher, 8), uri, PolicyCard(normalizer=NORMALIZER, teacher_hash=teacher_hash,
                                                                data_content_hash="data123", config_digest="cfg1"))
        trials.append(TrialResult(trial=name, params={"router.budget": compute}, student_uri=uri, success=success,
                                  compute_ratio=compute, action_mse_norm=0.1 + i / 100, latency_ms_median=1.0,
                                  episodes_per_task=count, eval_seed=first))
    own = trials.pop(0)
    paths.evaluate.mkdir(parents=True, exist_ok=True)
    report = EvaluationReport(tasks=["reach-v3"], seeds=[first + i for i in range(count)], max_steps=10,
                              policies={"teacher": _evaluated(0.8, 1.0, 0.05, count),
                                        "student": _evaluated(own.success, own.compute_ratio, own.action_mse_norm,
                                                              count)})
    (paths.evaluate / "report.json").write_text(report.to_json())
    # The pipeline's own student sits in the run's student folder: copy the first one there.
    paths.student.mkdir(parents=True, exist_ok=True)
    for f in Path(own.student_uri).iterdir():
        (paths.student / f.name).write_bytes(f.read_bytes())
    summary = SweepSummary(space="tune_spaces/smoke.yaml", trials=trials, stopped_early=0,
                           frontier=[t.trial for t in trials])
    (paths.sweep / "trials.json").write_text(summary.to_json())


def _aliases(client):
    out = {}
    for alias in ("challenger", "champion"):
        try:
            out[alias] = client.get_model_version_by_alias(NAME, alias).version
        except MlflowException:
            out[alias] = None
    return out


def test_gate_aliases_and_idempotency(run, mlflow_server):
    cfg, teacher, teacher_hash = run
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    # A registry URI left over in this process (as after loading another model) must not divert promote.
    mlflow.set_registry_uri(f"sqlite:///{RunPaths.of(cfg).root / 'stale-registry.db'}")
    # Round 1: A passes; B is too expensive; C lost too much success. Only A may be registered.
    _round(cfg, teacher, teacher_hash, {"A": (0.78, 0.5), "B": (0.95, 0.8), "C": (0.5, 0.3)})
    first = promote.main(cfg)
    assert _aliases(client) == {"challenger": "1", "champion": "1"}
    v1 = client.get_model_version(NAME, "1")
    assert v1.tags["source"] == "distill" and v1.tags["teacher_hash"] == teacher_hash
    assert v1.tags["data_content_hash"] == "data123" and v1.tags["config_digest"] == "cfg1"
    assert float(v1.tags["compute_ratio"]) == 0.5 and float(v1.tags["teacher_success"]) == 0.8
    # Measured on the teacher's episodes already: gated as it was, nothing re-evaluated.
    assert v1.tags["episodes_per_task"] == v1.tags["teacher_episodes_per_task"] == str(cfg.evaluate.episodes_per_task)
    assert "sweep_success" not in v1.tags
    # Running it again changes nothing.
    assert promote.main(cfg) == first
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1
    # Round 2: a better passing student becomes challenger and champion.
    _round(cfg, teacher, teacher_hash, {"D": (0.86, 0.45), "E": (0.2, 0.2)})
    promote.main(cfg)
    assert _aliases(client) == {"challenger": "2", "champion": "2"}
    # Round 3: a passing but worse student is challenger only.
    _round(cfg, teacher, teacher_hash, {"F": (0.79, 0.55)})
    promote.main(cfg)
    assert _aliases(client) == {"challenger": "3", "champion": "2"}
    # Round 4: nothing passes; nothing is registered and the champion stays.
    _round(cfg, teacher, teacher_hash, {"G": (0.99, 0.9), "H": (0.1, 0.1)})
    assert promote.main(cfg) is None
    assert _aliases(client) == {"challenger": "3", "champion": "2"}
    versions = client.search_model_versions(f"name='{NAME}'")
    assert len(versions) == 3
    assert not any(v.tags["source"] in ("B", "C", "E", "G", "H") for v in versions)   # failing ones, never


def _post(url, payload):
    return requests.post(f"{url}/invocations", data=json.dumps(payload), timeout=60,
                         headers={"Content-Type": "application/json"})


def test_mlflow_models_serve_answers_tensors_refuses_bad_requests_with_400_and_keeps_serving(run, mlflow_server,
                                                                                            tmp_path):
    cfg, teacher, teacher_hash = run
    # Its own registered model, so that this test stands alone.
    name, uri = f"{NAME}-served", str(tmp_path / "student")
    torch.manual_seed(1)
    student = derive_student(teacher, 8)
    torch.nn.init.normal_(student.router.out.weight, std=3.0)   # different inputs open different layers
    save_policy(student, uri, PolicyCard(normalizer=NORMALIZER, teacher_hash=teacher_hash, threshold=0.5,
                                         instructions={"reach-v3": "reach to the goal position"}))
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    mlflow.set_experiment("served")
    with mlflow.start_run():
        version = register_student(name, TrialResult(trial="s", params={}, student_uri=uri, success=1.0,
                                                     compute_ratio=0.5, action_mse_norm=0.1), {})
    set_aliases(name, version)
    port = free_port()
    # mlflow serve execs `uvicorn` by name: the venv's bin must be on PATH (CI calls .venv/bin/python directly).
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    policy = Policy(uri)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    proprio = rng.normal(0.3, 0.2, (32, 4)).astype(np.float32)
    words = ["reach to the goal position", "push the puck to the goal"]
    instructions = [words[i % 2] for i in range(32)]
    expected = policy.act(images, instructions, proprio)

    def one(i):
        return {"image": images[i:i + 1].tolist(), "instruction": [instructions[i]], "proprio": proprio[i:i + 1].tolist()}

    try:
        _wait_http(f"{url}/ping", proc, seconds=240)
        # The standard tensor JSON, by columns (inputs) and by rows (instances).
        reply = _post(url, {"inputs": {"image": images[:2].tolist(), "instruction": instructions[:2],
                                       "proprio": proprio[:2].tolist()}})
        assert reply.status_code == 200, reply.text
        np.testing.assert_allclose(reply.json()["predictions"], expected[:2], atol=1e-5)
        rows = [{"image": images[i].tolist(), "instruction": instructions[i], "proprio": proprio[i].tolist()}
                for i in range(2)]
        reply = _post(url, {"instances": rows})
        assert reply.status_code == 200, reply.text
        np.testing.assert_allclose(reply.json()["predictions"], expected[:2], atol=1e-5)
        # Malformed requests: a 4xx naming what is wrong, and the server goes on answering.
        bad = {"wrong image size": ({**one(0), "image": np.zeros((1, 16, 16, 3), int).tolist()}, "(1, 16, 16, 3)"),
               "missing field": ({k: v for k, v in one(0).items() if k != "proprio"}, "proprio"),
               "NaN proprio": ({**one(0), "proprio": [[0.1, float("nan"), 0.2, 0.3]]}, "proprio row(s) [0]")}
        for case, (inputs, named) in bad.items():
            reply = _post(url, {"inputs": inputs})
            assert 400 <= reply.status_code < 500, (case, reply.status_code, reply.text[:300])
            assert named in reply.json()["message"], (case, reply.json()["message"][-300:])
        # 32 concurrent requests get what the policy gives each alone.
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda i: _post(url, {"inputs": one(i)}), range(32)))
        assert all(r.status_code == 200 for r in replies)
        got = np.concatenate([r.json()["predictions"] for r in replies])
        np.testing.assert_allclose(got, expected, atol=1e-5)
    finally:
        stop_group(proc)
