"""The distill job: a routed student derived from the teacher, trained with the ActDistill loss."""

from __future__ import annotations

import sys

import mlflow

from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.distill.calibrate import calibrated
from pipeline.distill.fit import DistillResult, fit_student
from pipeline.ray_runtime import start_ray
from pipeline.stages import RunPaths
from pipeline.tracking.runs import stage_run
from pipeline.train.driver import record_run, train_run
from pipeline.train.loop import Tracking


def main(cfg: PipelineConfig, student_uri: str | None = None, run_name: str = "distill") -> DistillResult:
    """student_uri and run_name let bench/headline.py keep ablation students beside the pipeline's own."""
    start_ray(cfg)
    ray_run = train_run(cfg, "distill")
    with stage_run(cfg, run_name, resume_run_id=ray_run.mlflow_run_id) as run:
        if not ray_run.resumed:
            record_run(ray_run, cfg, "distill", run.info.run_id)
        result = fit_student(cfg, Tracking.of(cfg, run.info.run_id),
                             student_uri or str(RunPaths.of(cfg).student), ray_run)
        mlflow.log_metrics(result.metrics)
        calibrated(cfg, result.student_uri)   # router.calibrate_episodes > 0: the closed-loop threshold
        mlflow.set_tags({"student_uri": result.student_uri, "teacher_hash": result.teacher_hash,
                         "ray_run_name": ray_run.name})
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, "distill"))
