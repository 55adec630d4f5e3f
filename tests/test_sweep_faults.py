"""A sweep trial crashes: a Ray Train worker killed inside a trial. Tune restarts the trial, whose distill continues
from the trial's own last checkpoint with no step lost or repeated; a trial that keeps crashing is left out while
the other finishes; trials.json (what the frontier and promote read) holds only completed trials, and the MLflow
runs show each failed attempt, its error and the restart."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from fault_support import SMOKE, TINY, teacher_and_probes, write_expert_shards
from mlflow.tracking import MlflowClient

from jobs import sweep as sweep_job
from pipeline.config import load_config
from pipeline.ray_runtime import start_ray
from pipeline.stages import RunPaths
from pipeline.tune.trials import SweepSummary

pytestmark = pytest.mark.slow

STEPS, EVERY = 20, 5


def _ledger(path):
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:   # the worker is mid-way through appending this line
            pass
    return entries


def _committed(run_folder):
    try:
        latest = json.loads((run_folder / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return int(((latest.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("step", 0))


class Crasher(threading.Thread):
    """Kills the rank-0 worker of the first trial once and of the second trial twice (once per attempt), each
    time 2 steps past a registered checkpoint of that attempt."""

    def __init__(self, sweep_dir: Path) -> None:
        super().__init__(daemon=True)
        self.sweep_dir, self.kills = sweep_dir, {}      # trial -> pids killed
        self.order: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for ledger in self.sweep_dir.glob("*/ray/*/ledger/rank0.jsonl"):
                trial = ledger.parents[3].name
                if trial not in self.order:
                    self.order.append(trial)
                wanted = 1 if trial == self.order[0] else 2
                entries = _ledger(ledger)
                killed = self.kills.setdefault(trial, [])
                if not entries or len(killed) >= wanted or entries[-1]["pid"] in killed:
                    continue
                attempt = [e for e in entries if e["pid"] == entries[-1]["pid"]]
                committed = _committed(ledger.parent.parent)
                if committed >= attempt[0]["step"] and attempt[-1]["step"] >= committed + 2:
                    os.kill(attempt[-1]["pid"], signal.SIGKILL)
                    killed.append(attempt[-1]["pid"])
            time.sleep(0.02)


@pytest.fixture
def run_folder(tmp_path):
    shards = tmp_path / "shards"
    write_expert_shards(str(shards))
    space = tmp_path / "space.yaml"
    # Two families at the config's budget (0.5 of 2 layers): the shallow one starts first and is the recovered trial.
    space.write_text("distill.family: {grid: [shallow, routed]}\n")
    cfg = load_config(SMOKE, TINY + [
        "data.val_fraction=0.25", f"run.run_dir={tmp_path / 'run'}", f"data.shards_uri={shards}",
        f"sweep.space={space}",
        "sweep.scheduler=fifo", "sweep.trial_max_failures=1", "sweep.eval_episodes_per_task=1",
        "distill.teacher_mode=online", "distill.eval_every=0", f"distill.train.steps={STEPS}",
        "distill.train.batch_size=8", f"distill.train.checkpoint_every={EVERY}", "distill.train.ledger=true",
        "distill.train.max_failures=0", "distill.train.num_workers=1", "evaluate.max_steps=10",
        "evaluate.num_workers=1", "evaluate.envs_per_worker=2", "evaluate.latency_calls=3"])
    teacher_and_probes(cfg)
    yield cfg
    if ray.is_initialized():
        ray.shutdown()


def test_a_crashed_trial_restarts_from_its_checkpoint_and_one_that_keeps_crashing_is_left_out(run_folder,
                                                                                                 record_property):
    cfg = run_folder
    start_ray(cfg)
    crasher = Crasher(RunPaths.of(cfg).sweep)
    crasher.start()
    try:
        summary = sweep_job.main(cfg)
    finally:
        crasher.stop.set()
    recovered, lost = crasher.order
    assert len(crasher.kills[recovered]) == 1 and len(crasher.kills[lost]) == 2

    # Only the completed trial reaches trials.json, the frontier and so promote; the lost one is recorded.
    assert [t.trial for t in summary.trials] == [recovered] and summary.frontier == [recovered]
    assert SweepSummary.read(RunPaths.of(cfg).sweep / "trials.json").trials == summary.trials
    assert len(summary.failed) == 1 and "failed" in summary.failed[0].error
    assert summary.failed[0].params == {"distill.family": "routed"}
    # The shallow student runs the last of the 2 layers, exactly: compute 0.5 on every closed-loop call.
    assert summary.trials[0].family == "shallow" and summary.trials[0].compute_ratio == 0.5
    assert " | shallow | distill.family=shallow | 0.50 | " in (RunPaths.of(cfg).sweep / "frontier.md").read_text()

    # The recovered trial's distill went on from its own checkpoint: every optimizer step once.
    (ledger,) = (RunPaths.of(cfg).sweep / recovered).glob("ray/*/ledger/rank0.jsonl")
    entries = _ledger(ledger)
    pids = list(dict.fromkeys(e["pid"] for e in entries))
    assert len(pids) == 2
    resumed_at = next(e["step"] for e in entries if e["pid"] == pids[1]) - 1
    assert resumed_at >= EVERY and resumed_at % EVERY == 0
    kept = [e["step"] for e in entries if e["pid"] == pids[0] and e["step"] <= resumed_at]
    assert kept + [e["step"] for e in entries if e["pid"] == pids[1]] == list(range(1, STEPS + 1))

    # MLflow: each attempt is a run under the sweep; failed attempts say why, the restart says where it resumed.
    client = MlflowClient(cfg.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    (sweep,) = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    assert sweep.data.metrics["failed_trials"] == 1 and sweep.data.metrics["trials"] == 1
    attempts = {trial: sorted((r for r in runs if r.data.tags.get("trial") == trial), key=lambda r: r.info.start_time)
                for trial in (recovered, lost)}
    assert [r.info.status for r in attempts[recovered]] == ["FAILED", "FINISHED"]
    assert [r.info.status for r in attempts[lost]] == ["FAILED", "FAILED"]
    assert all("error" in r.data.tags for r in attempts[lost] + attempts[recovered][:1])
    assert attempts[recovered][1].data.tags["resumed_from_step"] == str(resumed_at)
    assert "success" in attempts[recovered][1].data.metrics
    restart = attempts[recovered][1].info
    record_property("fault", "a Ray Train worker killed inside a sweep trial (once; another trial twice)")
    record_property("outcome", f"trial restarted from its step-{resumed_at} checkpoint and completed; the twice-"
                               f"killed trial left out of trials.json and the frontier")
    record_property("steps_lost", 0)
    record_property("rows_lost", 0)
    record_property("recover_s", round((restart.end_time - restart.start_time) / 1000, 1))   # the restarted attempt
