"""The probe-teacher job: stage-1 probes on the frozen teacher, then labelled shards through Ray Data."""

from __future__ import annotations

import sys

import mlflow

from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.ray_runtime import start_ray
from pipeline.teacher.probing import ProbeResult, probe_teacher
from pipeline.tracking.runs import stage_run


def main(cfg: PipelineConfig) -> ProbeResult:
    start_ray(cfg)
    with stage_run(cfg, "probe-teacher"):
        result = probe_teacher(cfg)
        for step in range(0, len(result.losses), 10):
            mlflow.log_metric("probe/action_mse", result.losses[step], step=step)
        mlflow.log_metrics({"final_probe_mse": result.final_probe_mse, "labelled_rows": result.rows,
                            "skipped_bad_rows": result.skipped_bad_rows})
        mlflow.set_tags({"teacher_hash": result.teacher_hash, "labelled_uri": result.labelled_uri})
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, "probe-teacher"))
