"""The sweep job: Ray Tune over distill+evaluate trials, then the compute/success frontier in MLflow."""

from __future__ import annotations

import sys

import mlflow

from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.evaluate.report import EvaluationReport
from pipeline.ray_runtime import start_ray
from pipeline.stages import RunPaths, stage
from pipeline.tracking.runs import stage_run
from pipeline.tune.driver import run_trials
from pipeline.tune.frontier import frontier_plot, frontier_table, pareto
from pipeline.tune.space import load_space
from pipeline.tune.trials import SweepSummary, TeacherPoint


def teacher_reference(paths: RunPaths) -> TeacherPoint | None:
    """The teacher's point on the frontier plot, from the evaluate job's report when there is one."""
    try:
        report = EvaluationReport.read(stage("evaluate").require(paths))
    except FileNotFoundError:
        return None
    teacher = report.policies["teacher"]
    return TeacherPoint(success=teacher.success, ci95=teacher.ci95)


def main(cfg: PipelineConfig) -> SweepSummary:
    space = load_space(cfg.sweep.space, cfg)   # a bad space fails before any Ray work
    start_ray(cfg)
    paths = RunPaths.of(cfg)
    folder = paths.sweep
    folder.mkdir(parents=True, exist_ok=True)
    with stage_run(cfg, "sweep") as run:
        mlflow.log_artifact(cfg.sweep.space)
        trials, stopped, failed = run_trials(cfg, space, run.info.run_id)
        mlflow.log_metrics({"failed_trials": len(failed)})
        if failed:
            mlflow.log_dict({"failed": [f.model_dump() for f in failed]}, "failed_trials.json")
        if not trials:
            first = f"; first error: {failed[0].error}" if failed else ""
            raise RuntimeError(f"no trial completed: {stopped} stopped early (lower sweep.reduction_factor or use "
                               f"sweep.scheduler=fifo), {len(failed)} failed{first}")
        front = pareto(trials)   # completed trials only
        summary = SweepSummary(space=cfg.sweep.space, trials=trials, stopped_early=stopped,
                               frontier=[t.trial for t in front], teacher=teacher_reference(paths), failed=failed)
        (folder / "trials.json").write_text(summary.to_json())
        (folder / "frontier.md").write_text(frontier_table(trials, front, summary.teacher) + "\n")
        frontier_plot(trials, front, summary.teacher, folder / "frontier.png")
        for name in ("trials.json", "frontier.md", "frontier.png"):
            mlflow.log_artifact(str(folder / name))
        mlflow.log_metrics({"trials": len(trials), "stopped_early": stopped, "frontier_size": len(front)})
    print(frontier_table(trials, front, summary.teacher))
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, "sweep"))
