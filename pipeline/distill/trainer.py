"""Driver side of training: build the TorchTrainer, fit, and copy the exported policy to its URI."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.data
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.config import TrainSection
from pipeline.data import storage
from pipeline.models.checkpoint import CONFIG, WEIGHTS

log = logging.getLogger(__name__)


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


def fit(train_fn: Callable[[dict[str, Any]], None], job: Any, datasets: dict[str, ray.data.Dataset],
        train: TrainSection, name: str, storage_path: Path, local: bool, reserved: float = 0.0,
        callbacks: list[Any] | None = None) -> tuple[dict[str, Any], Checkpoint]:
    """Run `train_fn` on `train.num_workers` gloo workers; returns rank 0's metrics and its checkpoint."""
    if local:
        check_room_for_data(train, also_reserved=reserved)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=False,
                                     resources_per_worker={"CPU": train.cpus_per_worker}),
        torch_config=TorchConfig(backend="gloo"),
        datasets=datasets,
        run_config=RunConfig(name=name, storage_path=str(storage_path.resolve()), callbacks=callbacks or []),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {name} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} reported no checkpoint; see the worker logs above")
    return dict(result.metrics or {}), result.checkpoint


def publish_policy(checkpoint: Checkpoint, uri: str) -> None:
    """Copy the exported policy (weights + config) from the Ray checkpoint to its place in the run."""
    with checkpoint.as_directory() as folder:
        for name in (WEIGHTS, CONFIG):
            storage.write_bytes(storage.join(uri, name), (Path(folder) / name).read_bytes())
    log.info("policy written to %s", uri)
