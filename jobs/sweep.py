"""The sweep job: Ray Tune over distill+evaluate trials, then the compute/success frontier in MLflow."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import mlflow

from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.ray_runtime import start_ray
from pipeline.tracking.runs import stage_run
from pipeline.tune.driver import run_trials
from pipeline.tune.frontier import frontier_plot, frontier_table, pareto
from pipeline.tune.space import load_space


def teacher_reference(cfg: PipelineConfig) -> dict[str, float] | None:
    """The teacher's point on the frontier plot, from the evaluate job's report when there is one."""
    path = cfg.stage_dir("evaluate") / "report.json"
    if not path.is_file():
        return None
    teacher = json.loads(path.read_text())["policies"]["teacher"]
    return {"success": teacher["success"], "compute_ratio": 1.0}


def main(cfg: PipelineConfig) -> dict[str, Any]:
    space = load_space(cfg.sweep.space, cfg)   # a bad space fails before any Ray work
    start_ray(cfg)
    folder = cfg.stage_dir("sweep")
    folder.mkdir(parents=True, exist_ok=True)
    with stage_run(cfg, "sweep") as run:
        mlflow.log_artifact(cfg.sweep.space)
        trials, stopped = run_trials(cfg, space, run.info.run_id)
        if not trials:
            raise RuntimeError(f"all {stopped} trials were stopped early; lower sweep.reduction_factor or use "
                               f"sweep.scheduler=fifo")
        front = pareto(trials)
        summary = {"space": cfg.sweep.space, "trials": trials, "stopped_early": stopped, "frontier": [t["trial"] for t in front],
                   "teacher": teacher_reference(cfg)}
        (folder / "trials.json").write_text(json.dumps(summary, indent=2))
        (folder / "frontier.md").write_text(frontier_table(trials, front) + "\n")
        frontier_plot(trials, front, summary["teacher"], folder / "frontier.png")
        for name in ("trials.json", "frontier.md", "frontier.png"):
            mlflow.log_artifact(str(Path(folder, name)))
        mlflow.log_metrics({"trials": len(trials), "stopped_early": stopped, "frontier_size": len(front)})
    print(frontier_table(trials, front))
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, "sweep"))
