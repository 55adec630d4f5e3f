"""The train-teacher job: behaviour-clone a VLA on the trajectory shards with Ray Train + DeepSpeed."""

from __future__ import annotations

import sys

import mlflow

from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.ray_runtime import start_ray
from pipeline.teacher.cloning import TeacherResult, fit_teacher
from pipeline.tracking.runs import stage_run
from pipeline.train.driver import record_run, train_run
from pipeline.train.loop import Tracking


def main(cfg: PipelineConfig) -> TeacherResult:
    start_ray(cfg)
    ray_run = train_run(cfg, "train-teacher")
    with stage_run(cfg, "train-teacher", resume_run_id=ray_run.mlflow_run_id) as run:
        if not ray_run.resumed:
            record_run(ray_run, cfg, "train-teacher", run.info.run_id)
        result = fit_teacher(cfg, Tracking.of(cfg, run.info.run_id), ray_run)
        mlflow.log_metrics({"final_action_mse": result.final_action_mse, "optimizer_steps": result.optimizer_steps,
                            "train_episodes": result.train_episodes})
        mlflow.set_tags({"teacher_uri": result.uri, "teacher_hash": result.teacher_hash,
                         "data_content_hash": result.data_content_hash, "ray_run_name": ray_run.name})
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, "train-teacher"))
