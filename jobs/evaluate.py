"""The evaluate job: teacher vs routed student on the same closed-loop seeds, FLOPs and latency."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import mlflow

from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.data import storage
from pipeline.evaluate.report import summary_table, write_report
from pipeline.evaluate.suite import evaluate_policies
from pipeline.ray_runtime import start_ray
from pipeline.tracking.runs import stage_run


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """teacher/success, student/flops_backbone, student/backbone_flops_ratio, ... for MLflow."""
    out: dict[str, float] = {}
    for name, b in report["policies"].items():
        for key in ("success", "executed_fraction", "action_mse_norm", "action_mse_raw",
                    "latency_ms_median", "latency_ms_p90"):
            out[f"{name}/{key}"] = float(b[key])
        for part, value in b["flops"].items():
            out[f"{name}/flops_{part}"] = value
    for name, ratios in report.get("ratios", {}).items():
        out.update({f"{name}/{k}": v for k, v in ratios.items()})
    return out


def _resolve(cfg: PipelineConfig, where: str) -> str:
    """evaluate.extra values: a folder under run.run_dir, or an absolute path / URI as given."""
    return where if storage.has_scheme(where) or Path(where).is_absolute() else str(cfg.stage_dir(where))


def main(cfg: PipelineConfig) -> dict[str, Any]:
    start_ray(cfg)
    uris = {"teacher": str(cfg.stage_dir("teacher")), "student": str(cfg.stage_dir("student")),
            **{name: _resolve(cfg, where) for name, where in cfg.evaluate.extra.items()}}
    with stage_run(cfg, "evaluate"):
        report = evaluate_policies(cfg, uris, cfg.evaluate.episodes_per_task)
        paths = write_report(report, cfg.stage_dir("evaluate"))
        mlflow.log_metrics(flat_metrics(report))
        for path in paths.values():
            mlflow.log_artifact(str(path))
    print(summary_table(report))
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main, "evaluate"))
