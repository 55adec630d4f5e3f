"""MLflow runs: one per stage, nested under the pipeline run when there is one, config as an artifact."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

from pipeline.config import PipelineConfig, flat_params
from pipeline.tracking.metrics import redacted

log = logging.getLogger(__name__)


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
    uri = use_tracking(cfg)
    if resume_run_id is not None:
        run = mlflow.start_run(run_id=resume_run_id)
        mlflow.set_tag("resumed", "true")
    else:
        nested = mlflow.active_run() is not None
        tags = {"stage": stage, "pipeline_run": cfg.run.name, "config_digest": cfg.digest()}
        run = mlflow.start_run(run_name=stage, nested=nested, tags=tags)
        mlflow.log_params(flat_params(cfg))
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.yaml")
    try:
        yield run
    except BaseException:
        # The stage's own error is what the user must see, even when the tracking server cannot be told (an
        # outage is often why the stage failed): marking the run FAILED is best effort.
        try:
            mlflow.end_run("FAILED")
        except Exception as exc:
            log.warning("MLflow run %s could not be marked FAILED at %s: %s", run.info.run_id,
                        redacted(uri, uri), redacted(str(exc)[:300], uri))
        raise
    mlflow.end_run()
