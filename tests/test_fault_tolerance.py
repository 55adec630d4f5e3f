"""Training survives failures: a killed worker resumes from the last checkpoint (ZeRO-2), and an interrupted
run continues with --resume (ZeRO-3, online teacher on shifted images), with no optimizer step or row lost
or repeated."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from jobs import distill as distill_job
from jobs import train_teacher as teacher_job
from pipeline.cli import run_cli
from pipeline.config import load_config
from pipeline.data.shards import write_shards
from pipeline.models.checkpoint import PolicyCard, save_policy, save_probes
from pipeline.models.vla import VLA, teacher_config
from pipeline.ray_runtime import start_ray
from pipeline.sim.metaworld_env import run_expert_episode
from pipeline.stages import RunPaths
from pipeline.teacher.probing import new_probes
from pipeline.train.driver import train_run

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "configs" / "smoke.yaml"

pytestmark = pytest.mark.slow

# Tiny on purpose: the kill must land between checkpoints, and each fit costs ~10 s of Ray start-up.
TINY = ["collect.image_size=32", "model.patch_size=8", "model.hidden_size=32", "model.num_layers=2",
        "model.intermediate_size=64", "model.graph_width=16", "model.semantic_dim=16", "data.val_fraction=0",
        "run.ray_num_cpus=4"]


def _train(section, stage_args):
    return [f"{section}.{k}={v}" for k, v in stage_args.items()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    episodes = [run_expert_episode(task, seed, 32, "corner", 40) for task in ("reach-v3", "push-v3")
                for seed in (0, 1)]
    write_shards(episodes, str(folder), rows_per_shard=60)
    yield str(folder)
    if ray.is_initialized():
        ray.shutdown()


def _config_file(tmp_path, run_dir, shards, extra):
    """A YAML config, as a user would write it (resume needs the very same config again)."""
    raw = yaml.safe_load(SMOKE.read_text())
    path = tmp_path / f"{Path(run_dir).name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    overrides = TINY + [f"run.run_dir={run_dir}", f"data.shards_uri={shards}"] + extra
    return path, overrides


def _ledger(run_folder):
    """rank -> ledger lines (step, rows digest, pid) in the order the worker wrote them."""
    return {int(p.stem.removeprefix("rank")): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((run_folder / "ledger").glob("rank*.jsonl"))}


def _only_run(run_dir):
    (folder,) = [p for p in (Path(run_dir) / "ray").iterdir() if (p / "actdistill_run.json").is_file()]
    return folder


def _committed_step(run_folder):
    """The step of the run's latest checkpoint that Ray Train registered (a report still in flight when a
    worker dies is lost, so only a registered checkpoint can be resumed from)."""
    snapshot = run_folder / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (FileNotFoundError, json.JSONDecodeError):   # not written yet, or caught mid-write: poll again
        return 0
    return int(latest.get("metrics", {}).get("step", 0))


def _kill_after_checkpoint(run_dir, rank, job, outcome, timeout=600):
    """Once a checkpoint is registered, wait for `rank` to run 2 more steps, then SIGKILL that worker
    process. Returns the step it had finished."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not job.is_alive():
            raise AssertionError(f"the run ended before a worker could be killed: {outcome}")
        for ledger in (Path(run_dir) / "ray").glob(f"*/ledger/rank{rank}.jsonl"):
            committed = _committed_step(ledger.parent.parent)
            lines = ledger.read_text().splitlines()
            try:
                last = json.loads(lines[-1]) if lines else None
            except json.JSONDecodeError:   # the worker is mid-way through appending this line
                last = None
            if committed and last and last["step"] >= committed + 2:
                os.kill(last["pid"], signal.SIGKILL)
                return last["step"]
        time.sleep(0.01)
    raise TimeoutError(f"rank {rank} never got 2 steps past a registered checkpoint")


def _in_thread(fn):
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def _lineage(entries, steps):
    """The steps that made the final weights: each attempt's steps up to where the next attempt resumed."""
    attempts = []
    for entry in entries:
        if not attempts or entry["pid"] != attempts[-1][0]["pid"]:
            attempts.append([])
        attempts[-1].append(entry)
    kept = []
    for i, attempt in enumerate(attempts):
        resumed_at = attempts[i + 1][0]["step"] - 1 if i + 1 < len(attempts) else steps
        kept += [e for e in attempt if e["step"] <= resumed_at]
    return attempts, kept


def test_a_killed_worker_resumes_from_the_last_checkpoint_with_no_step_lost_or_repeated(shards, tmp_path):
    steps, every = 36, 6
    train = _train("teacher", dict(steps=steps, batch_size=8, checkpoint_every=every, keep_checkpoints=2,
                                   ledger="true", max_failures=1, zero_stage=2, log_every=6))
    # One MLflow store for both runs (a fresh sqlite store costs ~4 s of table creation); nothing here reads it.
    train.append(f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    ref_file, ref_over = _config_file(tmp_path, tmp_path / "reference", shards, train)
    kill_file, kill_over = _config_file(tmp_path, tmp_path / "killed", shards, train)

    teacher_job.main(load_config(ref_file, ref_over))          # also starts Ray in this (main) thread
    thread, outcome = _in_thread(lambda: teacher_job.main(load_config(kill_file, kill_over)))
    killed_at = _kill_after_checkpoint(tmp_path / "killed", rank=1, job=thread, outcome=outcome)
    thread.join(timeout=900)
    assert "error" not in outcome, outcome.get("error")

    reference, killed = _ledger(_only_run(tmp_path / "reference")), _ledger(_only_run(tmp_path / "killed"))
    for rank in (0, 1):
        attempts, kept = _lineage(killed[rank], steps)
        assert len(attempts) == 2, "the worker group was restarted once"
        resumed_from = attempts[1][0]["step"] - 1
        assert resumed_from % every == 0 and every <= resumed_from <= killed_at   # a checkpoint, not step 0
        # Exactly the planned optimizer steps, each once, on exactly the rows of an uninterrupted run.
        assert [e["step"] for e in kept] == list(range(1, steps + 1))
        assert [e["digest"] for e in kept] == [e["digest"] for e in reference[rank]]
    # Optimizer state and LR schedule were restored too: the weights equal the uninterrupted run's.
    ours = load_file(tmp_path / "killed" / "teacher" / "model.safetensors")
    theirs = load_file(tmp_path / "reference" / "teacher" / "model.safetensors")
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, atol=1e-5, rtol=1e-4)
    # keep_checkpoints, and no folder left by the report the kill cut short
    checkpoints = sorted(p for p in _only_run(tmp_path / "killed").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    assert json.loads((checkpoints[-1] / "progress.json").read_text())["step"] == steps


def _teacher_and_probes(cfg):
    """A random teacher and its probes: enough to test the training plane without training them."""
    torch.manual_seed(0)
    teacher = VLA(teacher_config(cfg.model, [32, 32, 3], 4, 4))
    stats = {"action_mean": [0.0] * 4, "action_std": [1.0] * 4, "proprio_mean": [0.0] * 4,
             "proprio_std": [1.0] * 4}
    digest = save_policy(teacher, str(RunPaths.of(cfg).teacher), PolicyCard(normalizer=stats))
    save_probes(new_probes(teacher, cfg.model), str(RunPaths.of(cfg).probes), {"teacher_hash": digest})


def test_an_interrupted_zero3_online_distill_continues_with_resume(shards, tmp_path):
    # The kill lands 2 steps past the first registered checkpoint (step 8 or so; ~1 s a step): 24 steps leave the
    # first attempt ~16 steps it must not finish, and the resumed one several checkpoints to write.
    steps, every = 24, 6
    train = _train("distill.train", dict(steps=steps, batch_size=8, checkpoint_every=every, ledger="true",
                                         max_failures=0, zero_stage=3, log_every=6))
    config, overrides = _config_file(tmp_path, tmp_path / "run", shards,
                                     train + ["distill.teacher_mode=online", "distill.eval_every=0",
                                              "distill.train.augment_shift=2"])   # online: shifts allowed
    cfg = load_config(config, overrides)
    _teacher_and_probes(cfg)

    # Ray's head processes die with the thread that started them (parent-death signal): start it here.
    start_ray(cfg)
    thread, outcome = _in_thread(lambda: distill_job.main(cfg))
    _kill_after_checkpoint(tmp_path / "run", rank=0, job=thread, outcome=outcome)
    thread.join(timeout=900)
    assert "failed" in str(outcome.get("error")) and "--resume" in str(outcome.get("error"))
    name = _only_run(tmp_path / "run").name

    # A config whose distill inputs differ may not continue the run; one that differs only in what distill
    # does not read (later stages' sections) continues it.
    for changed in ("distill.alpha=0.3", "router.budget=0.3"):
        with pytest.raises(ValueError, match="digest .* of the config sections distill depends on"):
            train_run(load_config(config, overrides + [changed, f"run.resume={name}"]), "distill")
    later = ["promote.model_name=another-name", "evaluate.episodes_per_task=7"]
    assert run_cli(distill_job.main, "distill", ["--config", str(config), "--resume", name, *overrides, *later]) == 0

    for rank, entries in _ledger(_only_run(tmp_path / "run")).items():
        attempts, kept = _lineage(entries, steps)
        assert len(attempts) == 2 and attempts[1][0]["step"] - 1 >= every
        assert [e["step"] for e in kept] == list(range(1, steps + 1))
    student = json.loads((RunPaths.of(cfg).student / "config.json").read_text())
    assert student["vla"]["router_hidden"] == cfg.router.hidden
    client = MlflowClient(cfg.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.data.tags["resumed"] == "true" and run.data.tags["ray_run_name"] == name
    assert run.data.metrics["optimizer_steps"] == steps


def test_resume_names_the_runs_it_could_continue(tmp_path):
    cfg = load_config(SMOKE, [f"run.run_dir={tmp_path}", "run.resume=no-such-run"])
    (tmp_path / "ray" / "smoke-distill-1").mkdir(parents=True)
    (tmp_path / "ray" / "smoke-distill-1" / "actdistill_run.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no-such-run.*runs there: smoke-distill-1"):
        train_run(cfg, "distill")
    assert run_cli(teacher_job.main, "collect", ["--config", str(SMOKE), "--resume", "x"]) == 2
