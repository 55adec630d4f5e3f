"""End to end: `actdistill run` on the smoke config with the real components, then its artifacts."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
from mlflow.tracking import MlflowClient

from jobs import promote
from pipeline.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "configs" / "smoke.yaml"
STAGES = {"collect", "train-teacher", "probe-teacher", "distill", "evaluate", "sweep", "promote"}
ACTDISTILL = str(Path(sys.executable).parent / "actdistill")

pytestmark = pytest.mark.slow


def _run(args, run_dir, timeout, overrides=()):
    # From the repository with a relative run.run_dir, as the README's command runs (runs/smoke): every
    # stage, Tune trials included (Tune runs each trial in its own working directory), must find it.
    relative = os.path.relpath(run_dir, REPO)
    proc = subprocess.run(args + ["--config", str(SMOKE), f"run.run_dir={relative}", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr   # what the terminal shows: Ray's forwarded worker logs go to stderr


def _promote_here(run_dir, overrides=()):
    """`python -m jobs.promote` in this process (run_cli is what the module's __main__ calls): no interpreter and
    imports to start again (~10 s a call). A re-evaluation starts Ray here (see ray_here)."""
    code = run_cli(promote.main, "promote", ["--config", str(SMOKE), f"run.run_dir={run_dir}", *overrides])
    assert code == 0


def _copy_run(run_dir, copy):
    """The run folder without Ray's storage (checkpoints), for a test that writes into it."""
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("ray"))
    return copy


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    stdout = _run([ACTDISTILL, "run"], run_dir, timeout=1500)
    return run_dir, stdout


def test_run_prints_the_summary_table_and_the_mlflow_store(smoke_run):
    run_dir, stdout = smoke_run
    assert "| teacher |" in stdout and "| student |" in stdout
    assert "latency ms" in stdout and "backbone MFLOPs/call" in stdout
    assert f"sqlite:///{run_dir.resolve()}/mlflow.db" in stdout


def test_each_stage_read_what_the_previous_one_wrote(smoke_run):
    run_dir, _ = smoke_run
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    assert manifest["num_episodes"] == 6 and manifest["action_dim"] == 4 and manifest["tasks"] == ["reach-v3", "push-v3"]
    teacher = json.loads((run_dir / "teacher" / "config.json").read_text())
    assert teacher["data_content_hash"] == manifest["content_hash"]
    labels = json.loads((run_dir / "labelled" / "labels.json").read_text())
    assert labels["teacher_hash"] == teacher["weights_sha256_16"] and labels["num_rows"] == manifest["num_steps"]
    student = json.loads((run_dir / "student" / "config.json").read_text())
    assert student["teacher_hash"] == teacher["weights_sha256_16"] and student["vla"]["router_hidden"]
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    t, s = report["policies"]["teacher"], report["policies"]["student"]
    assert t["episodes"] == s["episodes"] == 4                       # same seeds for both
    assert t["executed_fraction"] == 1.0 and s["executed_fraction"] < 1.0
    assert s["flops"]["backbone"] < t["flops"]["backbone"]
    sweep = json.loads((run_dir / "sweep" / "trials.json").read_text())
    # ASHA may stop the second trial on held-out action error; every trial is accounted for.
    assert len(sweep["trials"]) + sweep["stopped_early"] == 2 and sweep["trials"]
    assert {tr["params"]["router.budget"] for tr in sweep["trials"]} <= {0.3, 0.6}
    for tr in sweep["trials"]:
        assert abs(tr["compute_ratio"] - tr["params"]["router.budget"]) < 0.2   # the router met its budget


def test_every_stage_is_an_mlflow_run_with_its_config(smoke_run):
    run_dir, _ = smoke_run
    client = MlflowClient(f"sqlite:///{run_dir.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("actdistill")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    by_stage = {r.data.tags.get("stage"): r for r in runs}
    assert STAGES | {"pipeline", "sweep-trial"} <= set(by_stage)
    parent = by_stage["pipeline"].info.run_id
    for stage in STAGES:
        run = by_stage[stage]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.params["router.budget"] == "0.5"
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert by_stage["train-teacher"].data.metrics["final_action_mse"] > 0
    assert "train/action_mse" in by_stage["train-teacher"].data.metrics   # rank-0 step metrics
    assert "student/backbone_flops_ratio" in by_stage["evaluate"].data.metrics
    trials = [r for r in runs if r.data.tags.get("stage") == "sweep-trial"]
    assert len(trials) == 2 and all(r.data.tags["mlflow.parentRunId"] == by_stage["sweep"].info.run_id
                                    for r in trials)
    assert all(r.info.status in ("FINISHED", "KILLED") for r in trials)
    assert any("val/action_mse" in r.data.metrics for r in trials)             # what ASHA ranked
    sweep_artifacts = {a.path for a in client.list_artifacts(by_stage["sweep"].info.run_id)}
    assert {"frontier.png", "frontier.md", "trials.json"} <= sweep_artifacts


def test_promote_registered_an_aliased_version_and_a_second_promote_changes_nothing(smoke_run):
    run_dir, _ = smoke_run
    uri = f"sqlite:///{run_dir.resolve()}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("actdistill-smoke-student", "champion")
    assert champion.tags["student_hash"] and champion.tags["teacher_hash"] and champion.tags["data_content_hash"]
    before = [(v.version, dict(v.tags)) for v in client.search_model_versions("name='actdistill-smoke-student'")]
    _promote_here(run_dir)
    after = [(v.version, dict(v.tags)) for v in client.search_model_versions("name='actdistill-smoke-student'")]
    assert after == before
    assert client.get_model_version_by_alias("actdistill-smoke-student", "champion").version == champion.version


def test_the_registered_pyfunc_predicts_actions(smoke_run):
    run_dir, _ = smoke_run
    uri = f"sqlite:///{run_dir.resolve()}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/actdistill-smoke-student@champion")
    assert [spec.name for spec in model.metadata.get_input_schema().inputs] == ["image", "instruction", "proprio"]
    request = {"image": np.zeros((2, 64, 64, 3), np.uint8), "instruction": np.array(["reach to the goal position"] * 2),
               "proprio": np.array([[0.0, 0.6, 0.2, 1.0]] * 2, np.float32)}
    actions = model.predict(request)
    assert actions.shape == (2, 4) and np.isfinite(actions).all()


def test_a_job_runs_alone_as_a_module_on_the_run_folder(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    # On a copy (the job rewrites evaluate/, which the promote tests read), with the fewest closed-loop steps:
    # the point is the module running alone on a run folder, not the figures.
    copy = _copy_run(run_dir, tmp_path / "run")
    stdout = _run([sys.executable, "-m", "jobs.evaluate"], copy, timeout=600,
                  overrides=["evaluate.episodes_per_task=1", "evaluate.max_steps=10", "evaluate.latency_calls=3"])
    assert "| student |" in stdout


def test_the_terminal_shows_every_stage_and_training_progress_but_no_ray_data_redraws(smoke_run):
    _, output = smoke_run
    lines = output.splitlines()
    assert len(lines) < 300, f"{len(lines)} lines (9,100 before Ray Data's bars were turned off)"
    assert all(f"=== {stage} ===" in output for stage in STAGES)
    # Rank 0's progress line from the training loop, forwarded from a Ray Train worker.
    assert re.search(r"teacher step 40/40  loss \d+\.\d+  \d+ samples/s  ETA", output)
    assert re.search(r"student step \d+/\d+  loss ", output)
    assert "Running Dataset" not in output and "row/s]" not in output and "dataset sampling" not in output
    assert "requires_grad=True to a scalar" not in output


@pytest.fixture
def ray_here():
    """For jobs called in this process: the Ray instance they start (in this, the main thread) ends with the test."""
    yield
    ray.shutdown()


def test_promote_reevaluates_a_lucky_sweep_winner_on_the_teachers_episodes(smoke_run, tmp_path, ray_here):
    """A trial ranked on 1 episode per task is measured again on the teacher's 2 before the gate; the gate uses
    that measurement and the version's tags carry both."""
    run_dir, _ = smoke_run
    copy = _copy_run(run_dir, tmp_path / "run")
    trials = json.loads((copy / "sweep" / "trials.json").read_text())
    lucky = trials["trials"][0]
    lucky.update(student_uri=lucky["student_uri"].replace(str(run_dir), str(copy)), success=0.97,
                 compute_ratio=0.05, episodes_per_task=1, eval_seed=10_000)   # a lucky draw, cheap on paper
    (copy / "sweep" / "trials.json").write_text(json.dumps(trials))
    uri = f"sqlite:///{copy.resolve()}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    gate = ["promote.reevaluate_top=1", "promote.success_delta=1.0"]
    _promote_here(copy, ["promote.model_name=lucky", "promote.compute_budget=1.0", *gate])
    version = client.get_model_version_by_alias("lucky", "champion")
    assert version.tags["source"] == lucky["trial"]
    assert float(version.tags["sweep_success"]) == 0.97 and version.tags["sweep_episodes_per_task"] == "1"
    assert version.tags["episodes_per_task"] == version.tags["teacher_episodes_per_task"] == "2"
    success, compute = float(version.tags["success"]), float(version.tags["compute_ratio"])
    assert success in (0.0, 0.25, 0.5, 0.75, 1.0)        # 2 tasks x 2 episodes, not the sweep's 0.97
    assert compute > 0.05, "the test needs a student that runs some layers in closed loop"
    # The same trial under a compute budget its sweep figure meets and its closed-loop one does not: refused.
    budget = (0.05 + compute) / 2
    _promote_here(copy, ["promote.model_name=lucky-budget", f"promote.compute_budget={budget}", *gate])
    assert client.search_model_versions("name='lucky-budget'") == []
