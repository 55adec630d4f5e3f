"""The main job: collect -> train-teacher -> probe-teacher -> distill -> evaluate -> sweep -> promote."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import mlflow

from jobs import collect, distill, evaluate, probe_teacher, promote, sweep, train_teacher
from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.evaluate.report import summary_table
from pipeline.ray_runtime import start_ray
from pipeline.tracking.runs import stage_run
from pipeline.tune.space import load_space

log = logging.getLogger(__name__)

STAGES = [("collect", collect.main), ("train-teacher", train_teacher.main), ("probe-teacher", probe_teacher.main),
          ("distill", distill.main), ("evaluate", evaluate.main), ("sweep", sweep.main), ("promote", promote.main)]


def main(cfg: PipelineConfig) -> dict[str, Any]:
    load_space(cfg.sweep.space, cfg)  # the last stage's input is checked before the first one runs
    start_ray(cfg)
    outputs: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with stage_run(cfg, "pipeline"):   # each stage's run nests under this one
        for name, stage_main in STAGES:
            log.info("=== %s ===", name)
            started = time.perf_counter()
            outputs[name] = stage_main(cfg)
            seconds[name] = time.perf_counter() - started
            mlflow.log_metric(f"seconds/{name}", seconds[name])
    print_summary(cfg, outputs, seconds)
    return outputs


def print_summary(cfg: PipelineConfig, outputs: dict[str, Any], seconds: dict[str, float]) -> None:
    registered = outputs.get("promote")
    lines = ["", "=" * 80, f"ActDistill pipeline `{cfg.run.name}` finished in {sum(seconds.values()):.0f} s "
             f"({', '.join(f'{k} {v:.0f}s' for k, v in seconds.items())})", "",
             summary_table(outputs["evaluate"]), ""]
    if registered:
        lines.append(f"registry: {registered['name']} version {registered['version']} "
                     f"(@challenger={registered['challenger']}, @champion={registered['champion']})")
    else:
        lines.append("registry: no student passed the promotion gate")
    lines += [f"run folder:   {cfg.stage_dir('.').resolve()}",
              f"MLflow store: {cfg.tracking_uri}  (mlflow ui --backend-store-uri {cfg.tracking_uri})",
              "=" * 80]
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run_cli(main, "run"))
