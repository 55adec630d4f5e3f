"""MLflow runs: one per stage, nested under the pipeline run when there is one, config as an artifact."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

from pipeline.config import PipelineConfig, flat_params


def use_tracking(cfg: PipelineConfig) -> str:
    """Point MLflow at the configured store and experiment (created on the driver, before workers log)."""
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    # The registry follows the tracking store explicitly: a registry URI set earlier in this process
    # (another run, a notebook) must never receive this run's model versions.
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    return uri


@contextmanager
def stage_run(cfg: PipelineConfig, stage: str, resume_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one stage with every config value as a param and the config as YAML; a resumed
    training run (resume_run_id) keeps logging to the run it started in, whose params are already there."""
    use_tracking(cfg)
    if resume_run_id is not None:
        with mlflow.start_run(run_id=resume_run_id) as run:
            mlflow.set_tag("resumed", "true")
            yield run
        return
    nested = mlflow.active_run() is not None
    tags = {"stage": stage, "pipeline_run": cfg.run.name, "config_digest": cfg.digest()}
    with mlflow.start_run(run_name=stage, nested=nested, tags=tags) as run:
        mlflow.log_params(flat_params(cfg))
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.yaml")
        yield run
