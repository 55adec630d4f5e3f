"""The main job: every stage of pipeline/stages.py in order (collect -> ... -> promote) under one MLflow run."""

from __future__ import annotations

import importlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import mlflow

from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.evaluate.report import EvaluationReport, summary_table
from pipeline.ray_runtime import start_ray
from pipeline.stages import STAGES, RunPaths
from pipeline.tracking.registry import Registration
from pipeline.tracking.runs import stage_run
from pipeline.tune.space import load_space

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    """Each stage's typed result by stage name (collect: Manifest, evaluate: EvaluationReport, ...), and its time."""

    results: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def report(self) -> EvaluationReport:
        return self.results["evaluate"]

    @property
    def registration(self) -> Registration | None:
        return self.results["promote"]


def main(cfg: PipelineConfig) -> PipelineResult:
    load_space(cfg.sweep.space, cfg)  # the last stage's input is checked before the first one runs
    start_ray(cfg)
    out = PipelineResult()
    with stage_run(cfg, "pipeline"):   # each stage's run nests under this one
        for stage in STAGES:
            log.info("=== %s ===", stage.name)
            started = time.perf_counter()
            out.results[stage.name] = importlib.import_module(f"jobs.{stage.job}").main(cfg)
            out.seconds[stage.name] = time.perf_counter() - started
            mlflow.log_metric(f"seconds/{stage.name}", out.seconds[stage.name])
    print_summary(cfg, out)
    return out


def print_summary(cfg: PipelineConfig, out: PipelineResult) -> None:
    registered = out.registration
    lines = ["", "=" * 80, f"ActDistill pipeline `{cfg.run.name}` finished in {sum(out.seconds.values()):.0f} s "
             f"({', '.join(f'{k} {v:.0f}s' for k, v in out.seconds.items())})", "",
             summary_table(out.report), ""]
    if registered:
        lines.append(f"registry: {registered.name} version {registered.version} "
                     f"(@challenger={registered.challenger}, @champion={registered.champion})")
    else:
        lines.append("registry: no student passed the promotion gate")
    lines += [f"run folder:   {RunPaths.of(cfg).root}",
              f"MLflow store: {cfg.tracking_uri}  (mlflow ui --backend-store-uri {cfg.tracking_uri})",
              "=" * 80]
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run_cli(main, "run"))
