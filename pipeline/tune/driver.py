"""Ray Tune over distill+evaluate trials: one nested MLflow run per trial under the sweep's parent run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline.config import PipelineConfig, with_overrides
from pipeline.data import storage
from pipeline.distill.calibrate import calibrated
from pipeline.distill.fit import fit_student
from pipeline.evaluate.suite import evaluate_policies
from pipeline.stages import RunPaths
from pipeline.train.driver import TrainRun, registered_step
from pipeline.train.loop import Tracking
from pipeline.tune.trials import FailedTrial, TrialResult

log = logging.getLogger(__name__)

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
    # The trial's Ray Train run has a fixed name in its own folder: when Tune restarts a failed trial, the fit
    # continues from that run's last registered checkpoint (Ray Train restores a run whose name exists).
    train_run = TrainRun(name=f"{cfg.run.name}-{trial}", storage_path=(folder / "ray").resolve(), resumed=False)
    restored = registered_step(train_run)
    if restored:
        tags["resumed_from_step"] = str(restored)
        log.info("trial %s restarted: its distill continues from its checkpoint at step %d", trial, restored)
    with mlflow.start_run(run_name=trial, tags=tags) as run:
        mlflow.log_params(params)
        # TuneReportCallback forwards the workers' val_action_mse reports to Tune, where ASHA may stop
        # this trial between them (the fit is then interrupted and the trial has no evaluation).
        try:
            result = fit_student(cfg, Tracking.of(cfg, run.info.run_id), str(folder / "student"), train_run,
                                 reserved=TRIAL_RESOURCES["CPU"], callbacks=[TuneReportCallback()])
        except Exception as exc:
            mlflow.set_tag("error", str(exc)[:4000])   # what the MLflow UI shows of this attempt
            raise
        calibrated(cfg, result.student_uri)   # router.calibrate_episodes > 0: the closed-loop threshold
        report = evaluate_policies(cfg, {"student": result.student_uri}, cfg.sweep.eval_episodes_per_task)
        block = report.policies["student"]
        # val_action_mse here is the same held-out, hard-gated measure the workers reported during the fit.
        metrics = {"success": block.success, "compute_ratio": block.executed_fraction,
                   "val_action_mse": block.action_mse_norm, "action_mse_norm": block.action_mse_norm,
                   "latency_ms_median": block.latency_ms_median, "flops_total": block.flops["total"],
                   **{f"train_{k}": v for k, v in result.metrics.items()}}
        mlflow.log_metrics(metrics)
        (folder / "report.json").write_text(report.to_json())
        tune.report({**metrics, "trial": trial, "student_uri": result.student_uri, "family": cfg.distill.family,
                     "ci95": list(block.ci95), "mlflow_run_id": run.info.run_id})


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


def run_trials(cfg: PipelineConfig, space: dict[str, Any], parent_run_id: str
               ) -> tuple[list[TrialResult], int, list[FailedTrial]]:
    """Run the sweep: (evaluated trials, number stopped early by ASHA, trials that failed past
    sweep.trial_max_failures). A failed trial is restarted by Tune from its own checkpoint; one that keeps
    failing is left out, the others go on."""
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
                                  verbose=1 if cfg.run.verbose else 0,
                                  failure_config=tune.FailureConfig(max_failures=cfg.sweep.trial_max_failures)),
    )
    grid = tuner.fit()
    failed = [FailedTrial(params={k: r.config[k] for k in space}, error=str(r.error)[:4000])
              for r in grid if r.error is not None]
    for f in failed:
        log.warning("sweep trial %s failed after %d restart(s) and is left out: %s", f.params,
                    cfg.sweep.trial_max_failures, f.error.splitlines()[0] if f.error else "")
    trials, stopped_ids = [], set()
    for r in grid:
        m = r.metrics or {}
        if r.error is not None:
            continue
        if "success" not in m:
            stopped_ids.add(m.get("trial_id"))
            continue
        params = {k: r.config[k] for k in space}
        trials.append(TrialResult(trial=m["trial"], params=params, student_uri=m["student_uri"],
                                  mlflow_run_id=m["mlflow_run_id"], success=m["success"],
                                  compute_ratio=m["compute_ratio"], action_mse_norm=m["action_mse_norm"],
                                  latency_ms_median=m["latency_ms_median"], family=m["family"],
                                  ci95=tuple(m["ci95"]), episodes_per_task=cfg.sweep.eval_episodes_per_task,
                                  eval_seed=cfg.evaluate.seed))
    _close_stopped_runs(parent_run_id, stopped_ids)
    return trials, len(stopped_ids), failed


def _close_stopped_runs(parent_run_id: str, stopped_ids: set[str]) -> None:
    """Trials ASHA stopped were interrupted inside their MLflow run; mark the last run of each KILLED. Killed
    outright the run stays RUNNING; on a slower machine one ended FAILED (likely the stop arriving as an exception
    inside its `with start_run()`). Runs of failed attempts of other trials keep their FAILED status."""
    if not stopped_ids:
        return
    client = mlflow.MlflowClient()
    latest: dict[str, Any] = {}
    for run in client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        trial = run.data.tags.get("trial", "")
        if any(trial.endswith(i) for i in stopped_ids if i):
            if trial not in latest or run.info.start_time > latest[trial].info.start_time:
                latest[trial] = run
    for run in latest.values():
        if run.info.status in ("RUNNING", "FAILED"):
            client.set_terminated(run.info.run_id, status="KILLED")
