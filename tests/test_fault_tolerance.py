"""Training survives failures: a killed worker, and a lost node of a multi-node cluster, resume from the last
checkpoint (ZeRO-2); an interrupted run continues with --resume (ZeRO-3, online teacher on shifted images); no
optimizer step or row is lost or repeated."""

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
import yaml
from fault_support import SMOKE, TINY, in_thread, teacher_and_probes
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster
from safetensors.torch import load_file

from jobs import distill as distill_job
from jobs import train_teacher as teacher_job
from pipeline.cli import run_cli
from pipeline.config import load_config
from pipeline.ray_runtime import start_ray
from pipeline.stages import RunPaths
from pipeline.train.driver import train_run

pytestmark = pytest.mark.slow


def _train(section, stage_args):
    return [f"{section}.{k}={v}" for k, v in stage_args.items()]


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


def _past_checkpoint(run_dir, rank, job, outcome, timeout=600):
    """Once a checkpoint is registered, wait for `rank` to run 2 more steps; returns its last ledger line (the
    step it finished and its worker's pid)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not job.is_alive():
            raise AssertionError(f"the run ended before its fault could be injected: {outcome}")
        for ledger in (Path(run_dir) / "ray").glob(f"*/ledger/rank{rank}.jsonl"):
            committed = _committed_step(ledger.parent.parent)
            lines = ledger.read_text().splitlines()
            try:
                last = json.loads(lines[-1]) if lines else None
            except json.JSONDecodeError:   # the worker is mid-way through appending this line
                last = None
            if committed and last and last["step"] >= committed + 2:
                return last
        time.sleep(0.01)
    raise TimeoutError(f"rank {rank} never got 2 steps past a registered checkpoint")


def _kill_after_checkpoint(run_dir, rank, job, outcome):
    """SIGKILL `rank`'s worker process 2 steps past a registered checkpoint; returns the step it had finished."""
    last = _past_checkpoint(run_dir, rank, job, outcome)
    os.kill(last["pid"], signal.SIGKILL)
    return last["step"]


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


STEPS, EVERY = 36, 6
TEACHER = _train("teacher", dict(steps=STEPS, batch_size=8, checkpoint_every=EVERY, keep_checkpoints=2,
                                 ledger="true", max_failures=1, zero_stage=2, log_every=6))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted train-teacher run of TEACHER on a local Ray: what every interrupted run must equal. Its
    MLflow store is shared by the interrupted runs (a fresh sqlite store costs ~4 s of table creation)."""
    folder = tmp_path_factory.mktemp("reference")
    tracking = [f"tracking.tracking_uri=sqlite:///{folder / 'mlflow.db'}"]
    ref_file, ref_over = _config_file(folder, folder / "reference", shards, TEACHER + tracking)
    teacher_job.main(load_config(ref_file, ref_over))          # also starts Ray in this (main) thread
    return folder / "reference", tracking


def _assert_resumed_like(reference_dir, run_dir, stopped_at, output="teacher"):
    """One restart from a checkpoint at or before `stopped_at`; exactly STEPS optimizer steps, each once, on the
    reference's rows; the reference's final weights (the stage's `output` folder); keep_checkpoints, and no folder
    left by a cut-short report."""
    reference, resumed = _ledger(_only_run(reference_dir)), _ledger(_only_run(run_dir))
    for rank in (0, 1):
        attempts, kept = _lineage(resumed[rank], STEPS)
        assert len(attempts) == 2, "the worker group was restarted once"
        resumed_from = attempts[1][0]["step"] - 1
        assert resumed_from % EVERY == 0 and EVERY <= resumed_from <= stopped_at   # a checkpoint, not step 0
        assert [e["step"] for e in kept] == list(range(1, STEPS + 1))
        assert [e["digest"] for e in kept] == [e["digest"] for e in reference[rank]]
    # Optimizer state and LR schedule were restored too: the weights equal the uninterrupted run's.
    ours = load_file(Path(run_dir) / output / "model.safetensors")
    theirs = load_file(Path(reference_dir) / output / "model.safetensors")
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, atol=1e-5, rtol=1e-4)
    checkpoints = sorted(p for p in _only_run(run_dir).glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    assert json.loads((checkpoints[-1] / "progress.json").read_text())["step"] == STEPS


def test_a_killed_worker_resumes_from_the_last_checkpoint_with_no_step_lost_or_repeated(shards, reference,
                                                                                        tmp_path):
    reference_dir, tracking = reference
    kill_file, kill_over = _config_file(tmp_path, tmp_path / "killed", shards, TEACHER + tracking)
    start_ray(load_config(kill_file, kill_over))   # a no-op after the reference; in the main thread either way
    thread, outcome = in_thread(lambda: teacher_job.main(load_config(kill_file, kill_over)))
    killed_at = _kill_after_checkpoint(tmp_path / "killed", rank=1, job=thread, outcome=outcome)
    thread.join(timeout=900)
    assert "error" not in outcome, outcome.get("error")
    _assert_resumed_like(reference_dir, tmp_path / "killed", killed_at)


TRAIN_NODE = {"actdistill-role": "train"}
# The distill of the lost-node test: the student of a random teacher with the teacher online (no labels to make).
DISTILL = _train("distill.train", dict(steps=STEPS, batch_size=8, checkpoint_every=EVERY, keep_checkpoints=2,
                                       ledger="true", max_failures=1, zero_stage=2, log_every=6)) + [
    "distill.teacher_mode=online", "distill.eval_every=0"]


@pytest.fixture(scope="module")
def distill_reference(shards, tmp_path_factory):
    """An uninterrupted distill of DISTILL on a local Ray: what the run that loses a node must equal."""
    folder = tmp_path_factory.mktemp("distill-reference")
    tracking = [f"tracking.tracking_uri=sqlite:///{folder / 'mlflow.db'}"]
    config, overrides = _config_file(folder, folder / "reference", shards, DISTILL + tracking)
    cfg = load_config(config, overrides)
    teacher_and_probes(cfg)
    start_ray(cfg)
    distill_job.main(cfg)
    return folder / "reference", tracking


@pytest.fixture
def three_nodes():
    """A Ray cluster of three nodes on this machine (Ray's own cluster utility: a head and two worker nodes,
    each its own raylet and object store, all on this machine's address). The head has the CPUs for Ray Data and the driver;
    each worker node 1 CPU and the label training workers are placed by. Nodes are declared dead after ~2 s
    of failed health checks (Ray's default is ~15 s)."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    for _ in range(2):
        cluster.add_node(num_cpus=1, labels=TRAIN_NODE)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _node_of(cluster, pid):
    """The worker node whose raylet started process `pid`."""
    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    (node,) = [n for n in cluster.worker_nodes if n.all_processes["raylet"][0].process.pid in ancestors]
    return node


def _alive_train_nodes():
    return sum(1 for n in ray.nodes() if n["Alive"] and n.get("Labels", {}).get("actdistill-role") == "train")


def test_a_lost_node_resumes_on_a_new_one_with_no_step_lost_or_repeated(shards, distill_reference, three_nodes,
                                                                        tmp_path, record_property):
    """A distill's two training workers sit on different nodes; the raylet of rank 1's node is killed 2 steps past
    a registered checkpoint (its workers die with it); the run waits for a node, goes on from that checkpoint
    once one is added, and ends as the uninterrupted run did."""
    reference_dir, tracking = distill_reference
    placement = ["distill.train.placement_strategy=STRICT_SPREAD",
                 "distill.train.node_labels={actdistill-role: train}", f"run.ray_address={three_nodes.address}"]
    config, overrides = _config_file(tmp_path, tmp_path / "lost", shards, DISTILL + tracking + placement)
    cfg = load_config(config, overrides)
    teacher_and_probes(cfg)                      # the reference's teacher: same seed, same weights and hash
    start_ray(cfg)                               # joins the cluster, in the main thread
    thread, outcome = in_thread(lambda: distill_job.main(cfg))
    last = _past_checkpoint(tmp_path / "lost", rank=1, job=thread, outcome=outcome)
    rank0 = json.loads((_only_run(tmp_path / "lost") / "ledger" / "rank0.jsonl").read_text().splitlines()[0])
    lost = _node_of(three_nodes, last["pid"])
    assert _node_of(three_nodes, rank0["pid"]) is not lost, "the two workers share a node"
    lost_at = time.time()
    three_nodes.remove_node(lost, allow_graceful=False)   # SIGKILL: the raylet, its object store, its workers
    while _alive_train_nodes() > 1:                       # the head declares it dead
        time.sleep(0.2)
    three_nodes.add_node(num_cpus=1, labels=TRAIN_NODE)
    ledger = _only_run(tmp_path / "lost") / "ledger" / "rank1.jsonl"
    while thread.is_alive() and all(json.loads(line)["pid"] == last["pid"]
                                    for line in ledger.read_text().splitlines()[:-1]):
        time.sleep(0.1)   # [:-1]: the last line may be half written
    recovered_s = time.time() - lost_at   # from the kill to the restarted group's second step
    thread.join(timeout=900)
    assert "error" not in outcome, outcome.get("error")
    _assert_resumed_like(reference_dir, tmp_path / "lost", last["step"], output="student")
    record_property("fault", "a distill worker's node lost (its raylet killed) on a 3-node cluster; a node added "
                             "back")
    record_property("outcome", "worker group restarted on the new node from the last registered checkpoint; "
                               "weights equal an uninterrupted run's")
    record_property("steps_lost", 0)
    record_property("rows_lost", 0)
    record_property("recover_s", round(recovered_s, 1))


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
    teacher_and_probes(cfg)

    # Ray's head processes die with the thread that started them (parent-death signal): start it here.
    start_ray(cfg)
    thread, outcome = in_thread(lambda: distill_job.main(cfg))
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
