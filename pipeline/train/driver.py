"""Driver side of training (Ray Train): a run's name and resume record, the TorchTrainer fit, publishing the policy."""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.config import PipelineConfig, TrainSection
from pipeline.data import storage
from pipeline.models.checkpoint import CONFIG, WEIGHTS
from pipeline.stages import RunPaths, inputs, inputs_digest
from pipeline.train.device import Device

log = logging.getLogger(__name__)

# Ray Train V2 restores a run from this file in <storage_path>/<name>: its presence is what makes a
# name resumable (and why every fresh run gets a fresh name).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
RUN_RECORD = "actdistill_run.json"


@dataclass(frozen=True)
class TrainRun:
    """One Ray Train run: a fresh name per run; reusing a name continues that run from its last checkpoint."""

    name: str
    storage_path: Path
    resumed: bool
    mlflow_run_id: str | None = None     # the MLflow run a resumed run keeps logging to

    @property
    def folder(self) -> Path:
        return self.storage_path / self.name

    @property
    def ledger_dir(self) -> str:
        return str(self.folder / "ledger")


def _runs_in(storage_path: Path) -> list[str]:
    if not storage_path.is_dir():
        return []
    return sorted(p.name for p in storage_path.iterdir() if (p / RUN_RECORD).is_file())


def train_run(cfg: PipelineConfig, stage: str, storage_path: Path | None = None) -> TrainRun:
    """A fresh run, or (run.resume=NAME) the interrupted run NAME after checking it is this stage and that the
    config sections its output depends on are unchanged (stages.inputs: other sections may differ)."""
    storage_path = (storage_path or RunPaths.of(cfg).ray).resolve()
    if not cfg.run.resume:
        name = f"{cfg.run.name}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        return TrainRun(name=name, storage_path=storage_path, resumed=False)
    name = cfg.run.resume
    record_path = storage_path / name / RUN_RECORD
    if not record_path.is_file() or not (storage_path / name / RAY_SNAPSHOT).is_file():
        runs = _runs_in(storage_path)
        raise FileNotFoundError(f"run.resume={name!r}: no resumable run of that name in {storage_path}; "
                                f"runs there: {', '.join(runs) or 'none'}")
    record = json.loads(record_path.read_text())
    if record["stage"] != stage:
        raise ValueError(f"run.resume={name!r} is a {record['stage']} run, not {stage}; "
                         f"resume it with `actdistill {record['stage']}`")
    digest = inputs_digest(cfg, stage)
    # Records written before the stage graph hold the whole config's digest: an identical config still resumes.
    if record["config_digest"] not in (digest, cfg.digest()):
        raise ValueError(f"run.resume={name!r} was started with digest {record['config_digest']} of the config "
                         f"sections {stage} depends on ({', '.join(inputs(stage))}); this config has {digest}. "
                         f"Pass the same --config and overrides as the interrupted run for those sections")
    return TrainRun(name=name, storage_path=storage_path, resumed=True, mlflow_run_id=record["mlflow_run_id"])


def record_run(run: TrainRun, cfg: PipelineConfig, stage: str, mlflow_run_id: str) -> None:
    """What `--resume` checks later: the stage, the digest of its config inputs and the MLflow run to continue."""
    run.folder.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "config_digest": inputs_digest(cfg, stage), "mlflow_run_id": mlflow_run_id}
    (run.folder / RUN_RECORD).write_text(json.dumps(record, indent=2))
    log.info("Ray Train run %s (continue it after an interruption with --resume %s)", run.name, run.name)


def replayable_data_config() -> DataConfig:
    """Exact resume needs every worker to see the same rows in the same order on every attempt: with
    Ray's defaults (unordered execution, locality-aware splitting) two runs over the same seeded shuffle
    gave different per-worker orders; with preserve_order and no locality hints they were identical."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options, enable_shard_locality=False)


def check_room_for_data(train: TrainSection, also_reserved: float = 0.0) -> None:
    """Ray Data's read tasks need 1 free CPU beside the workers; on a local Ray (which cannot grow)
    the fit would hang forever, so fail now. Autoscaling clusters are not checked."""
    total = ray.cluster_resources().get("CPU", 0.0)
    free = total - train.num_workers * train.cpus_per_worker - also_reserved
    if free < 1.0:
        raise RuntimeError(
            f"the Ray cluster has {total:g} CPUs; {train.num_workers} workers x {train.cpus_per_worker:g} CPU"
            f"{f' + {also_reserved:g} for the Tune trial' if also_reserved else ''} leave {free:.2f} for Ray Data, "
            f"which needs 1 or the run hangs. Set run.ray_num_cpus={int(total + 2)} (logical CPUs) or lower "
            f"cpus_per_worker")


def scaling(train: TrainSection, device: Device) -> ScalingConfig:
    """train.num_workers workers of train.cpus_per_worker CPUs each, and on cuda one GPU each, placed by
    train.placement_strategy on nodes carrying train.node_labels."""
    gpu = device == "cuda"
    resources = {"CPU": train.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    return ScalingConfig(num_workers=train.num_workers, use_gpu=gpu, resources_per_worker=resources,
                         placement_strategy=train.placement_strategy, label_selector=train.node_labels or None)


def fit(train_fn: Callable[[dict[str, Any]], None], job: Any, datasets: dict[str, ray.data.Dataset],
        train: TrainSection, run: TrainRun, local: bool, reserved: float = 0.0,
        callbacks: list[Any] | None = None, device: Device = "cpu") -> tuple[dict[str, Any], Checkpoint]:
    """Run `train_fn` on `train.num_workers` workers (gloo on CPU; on cuda one GPU each and NCCL; the device
    comes from resolve_device); returns rank 0's metrics and its last checkpoint.

    A worker failure restarts the whole worker group from the last checkpoint, up to train.max_failures
    times; the last train.keep_checkpoints checkpoints stay on storage."""
    if local:
        check_room_for_data(train, also_reserved=reserved)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"job": job},
        scaling_config=scaling(train, device),
        torch_config=TorchConfig(backend="nccl" if device == "cuda" else "gloo"),
        datasets=datasets,
        dataset_config=replayable_data_config(),
        run_config=RunConfig(name=run.name, storage_path=str(run.storage_path), callbacks=callbacks or [],
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints)),
    )
    try:
        result = trainer.fit()
        error = result.error
    except ray.train.TrainingFailedError as exc:   # Ray 2.60 raises where older releases returned it
        error = exc
    _remove_unregistered_checkpoints(run)
    if error is not None:
        # Each worker's exception in full, then Ray's message with its (truncated) tracebacks.
        causes = worker_causes(error)
        detail = f"the workers raised:\n{causes}\n{error}" if causes else str(error)
        if _out_of_space(detail):
            step = registered_step(run)
            kept = f"its last registered checkpoint (step {step}) is intact" if step else "no checkpoint was registered"
            raise RuntimeError(f"training run {run.name} failed: its run folder {run.storage_path} is out of space "
                               f"(No space left on device) while writing a checkpoint; {kept}. Free space there, "
                               f"then continue it with --resume {run.name}\n{detail}") from error
        if "AWS Error" in detail:
            raise RuntimeError(f"training run {run.name} failed reading S3 after every retry (pyarrow: "
                               f"{storage.S3_OPTIONS.max_attempts} attempts per request; Ray Data: up to 10 per "
                               f"file operation, backing off to 32 s); the error below names the bucket and key. "
                               f"Once the endpoint answers, continue it with --resume {run.name}\n{detail}") from error
        raise RuntimeError(f"training run {run.name} failed: {detail}\nafter fixing the cause, continue it with "
                           f"--resume {run.name}") from error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run.name} reported no checkpoint; see the worker logs above")
    return dict(result.metrics or {}), result.checkpoint


def worker_causes(error: BaseException) -> str:
    """Each failed worker's exception in full, one line per distinct one ("" for an error that is not a worker
    group's). Ray's WorkerGroupError message keeps only the first and last 500 characters of a worker's traceback,
    which can cut the middle out of a message that names its cause (the tracking server's URI, the S3 key)."""
    failures = getattr(error, "worker_failures", None) or {}
    lines: dict[str, list[int]] = {}
    for rank, exc in sorted(failures.items()):
        lines.setdefault(f"{type(exc).__name__}: {exc}", []).append(rank)
    return "\n".join(f"rank {', '.join(map(str, ranks))}: {line}" for line, ranks in lines.items())


def _out_of_space(text: str) -> bool:
    # A worker's error reaches the driver as text (Ray's WorkerGroupError), so look for ENOSPC's message.
    return "No space left on device" in text or "[Errno 28]" in text


def registered_step(run: TrainRun) -> int:
    """The optimizer step of the run's latest checkpoint that Ray registered (0: none)."""
    try:
        latest = json.loads((run.folder / RAY_SNAPSHOT).read_text()).get("latest_checkpoint_result") or {}
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return int(latest.get("metrics", {}).get("step", 0))


def _remove_unregistered_checkpoints(run: TrainRun) -> None:
    """A worker killed mid-report leaves a checkpoint folder Ray never registered (and so never deletes):
    at 7B that is ~80 GB of optimizer state. Once the fit is over, remove what the snapshot does not list."""
    snapshot = run.folder / RAY_SNAPSHOT
    if not snapshot.is_file():
        return
    state = json.loads(snapshot.read_text())
    kept = {c["checkpoint_dir_name"] for c in state.get("checkpoint_results", [])}
    for folder in run.folder.glob("checkpoint_*"):
        if folder.is_dir() and folder.name not in kept:
            log.info("removing %s: a checkpoint whose report was cut short by a failure", folder)
            shutil.rmtree(folder)


def publish_policy(checkpoint: Checkpoint, uri: str) -> None:
    """Copy the exported policy (weights + config) from the Ray checkpoint to its place in the run."""
    with checkpoint.as_directory() as folder:
        for name in (WEIGHTS, CONFIG):
            storage.write_bytes(storage.join(uri, name), (Path(folder) / name).read_bytes())
    log.info("policy written to %s", uri)
