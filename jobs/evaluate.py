"""The evaluate job: teacher vs routed student on the same closed-loop seeds, FLOPs and latency."""

from __future__ import annotations

import sys

import mlflow

from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.evaluate.report import EvaluationReport, summary_table, write_report
from pipeline.evaluate.suite import evaluate_policies
from pipeline.ray_runtime import start_ray
from pipeline.stages import RunPaths
from pipeline.tracking.runs import stage_run


def main(cfg: PipelineConfig) -> EvaluationReport:
    start_ray(cfg)
    paths = RunPaths.of(cfg)
    uris = {"teacher": str(paths.teacher), "student": str(paths.student),
            **{name: paths.under(where) for name, where in cfg.evaluate.extra.items()}}
    with stage_run(cfg, "evaluate"):
        report = evaluate_policies(cfg, uris, cfg.evaluate.episodes_per_task)
        written = write_report(report, paths.evaluate)
        mlflow.log_metrics(report.flat_metrics())
        for path in written.values():
            mlflow.log_artifact(str(path))
    print(summary_table(report))
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main, "evaluate"))
