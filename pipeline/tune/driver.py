"""Ray Tune over distill+evaluate trials: one nested MLflow run per trial under the sweep's parent run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline.config import PipelineConfig, with_overrides
from pipeline.data import storage
from pipeline.distill.fit import fit_student
from pipeline.evaluate.suite import evaluate_policies
from pipeline.stages import RunPaths
from pipeline.train.driver import TrainRun
from pipeline.train.loop import Tracking
from pipeline.tune.trials import TrialResult

# Trials hold almost no CPU themselves: their Ray Train workers and rollout tasks reserve their own.
TRIAL_RESOURCES = {"CPU": 0.01}


def trial_fn_per_trial(params: dict[str, Any], base: dict[str, Any], parent_run_id: str) -> None:
    """One trial (runs in a Tune actor): distill with the sampled values, evaluate the student, report."""
    cfg = with_overrides(PipelineConfig.model_validate(base), params)
    trial = tune.get_context().get_trial_name()
    folder = RunPaths.of(cfg).sweep / trial
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    tags = {"mlflow.parentRunId": parent_run_id, "stage": "sweep-trial", "trial": trial,
            "config_digest": cfg.digest()}
    with mlflow.start_run(run_name=trial, tags=tags) as run:
        mlflow.log_params(params)
        # TuneReportCallback forwards the workers' val_action_mse reports to Tune, where ASHA may stop
        # this trial between them (the fit is then interrupted and the trial has no evaluation).
        result = fit_student(cfg, Tracking.of(cfg, run.info.run_id), str(folder / "student"),
                             TrainRun(name=f"{cfg.run.name}-{trial}", storage_path=(folder / "ray").resolve(),
                                      resumed=False),
                             reserved=TRIAL_RESOURCES["CPU"], callbacks=[TuneReportCallback()])
        report = evaluate_policies(cfg, {"student": result.student_uri}, cfg.sweep.eval_episodes_per_task)
        block = report.policies["student"]
        # val_action_mse here is the same held-out, hard-gated measure the workers reported during the fit.
        metrics = {"success": block.success, "compute_ratio": block.executed_fraction,
                   "val_action_mse": block.action_mse_norm, "action_mse_norm": block.action_mse_norm,
                   "latency_ms_median": block.latency_ms_median, "flops_total": block.flops["total"],
                   **{f"train_{k}": v for k, v in result.metrics.items()}}
        mlflow.log_metrics(metrics)
        (folder / "report.json").write_text(report.to_json())
        tune.report({**metrics, "trial": trial, "student_uri": result.student_uri,
                     "mlflow_run_id": run.info.run_id})


def scheduler(cfg: PipelineConfig) -> Any:
    """ASHA on held-out action error (reported every distill.eval_every steps), or first-in first-out."""
    if cfg.sweep.scheduler == "fifo" or not cfg.distill.eval_every:
        return tune.schedulers.FIFOScheduler()
    # periodic validation reports + the fit's final report + the trial's evaluated report
    rungs = cfg.distill.train.steps // cfg.distill.eval_every + 2
    return tune.schedulers.ASHAScheduler(metric="val_action_mse", mode="min", time_attr="training_iteration",
                                         max_t=rungs, grace_period=min(cfg.sweep.grace_period, rungs),
                                         reduction_factor=cfg.sweep.reduction_factor)


def anchored(cfg: PipelineConfig) -> PipelineConfig:
    """The config with local paths made absolute: Tune runs each trial in its own working directory, where
    a relative run.run_dir (runs/smoke, the configs' default) would point into the trial's folder."""
    overrides = {"run.run_dir": str(Path(cfg.run.run_dir).resolve())}
    for key, value in (("data.shards_uri", cfg.data.shards_uri), ("data.labelled_uri", cfg.data.labelled_uri)):
        if value and not storage.has_scheme(value):
            overrides[key] = str(Path(value).resolve())
    return with_overrides(cfg, overrides)


def run_trials(cfg: PipelineConfig, space: dict[str, Any], parent_run_id: str) -> tuple[list[TrialResult], int]:
    """Run the sweep: (evaluated trials, number stopped early by ASHA). A failed trial is an error."""
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn_per_trial, base=anchored(cfg).model_dump(mode="json"),
                             parent_run_id=parent_run_id),
        TRIAL_RESOURCES)
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(num_samples=cfg.sweep.num_samples, scheduler=scheduler(cfg),
                                    max_concurrent_trials=cfg.sweep.max_concurrent_trials),
        # verbose=0: no trial-status table every 30 s (~90 of the smoke run's lines); each trial's rank 0
        # still prints its step lines, and the sweep logs the frontier. run.verbose=true: Tune's default (1).
        run_config=tune.RunConfig(name=f"{cfg.run.name}-sweep", storage_path=str(RunPaths.of(cfg).ray),
                                  verbose=1 if cfg.run.verbose else 0),
    )
    grid = tuner.fit()
    failed = [r for r in grid if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(grid)} sweep trials failed; first error: {failed[0].error}")
    _close_stopped_runs(parent_run_id)
    trials, stopped = [], 0
    for r in grid:
        m = r.metrics or {}
        if "success" not in m:
            stopped += 1
            continue
        params = {k: r.config[k] for k in space}
        trials.append(TrialResult(trial=m["trial"], params=params, student_uri=m["student_uri"],
                                  mlflow_run_id=m["mlflow_run_id"], success=m["success"],
                                  compute_ratio=m["compute_ratio"], action_mse_norm=m["action_mse_norm"],
                                  latency_ms_median=m["latency_ms_median"],
                                  episodes_per_task=cfg.sweep.eval_episodes_per_task, eval_seed=cfg.evaluate.seed))
    return trials, stopped


def _close_stopped_runs(parent_run_id: str) -> None:
    """Trials ASHA stopped were interrupted inside their MLflow run; mark those runs KILLED. Killed outright
    the run stays RUNNING; on a slower machine one ended FAILED (likely the stop arriving as an exception
    inside its `with start_run()`). Called only after no trial reported an error, so neither is a real failure."""
    client = mlflow.MlflowClient()
    for run in client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        if run.info.status in ("RUNNING", "FAILED"):
            client.set_terminated(run.info.run_id, status="KILLED")
