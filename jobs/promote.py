"""The promote job: gate the sweep's students against the teacher and register the best in MLflow."""

from __future__ import annotations

import json
import logging
import sys

import mlflow

from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.evaluate.report import EvaluationReport
from pipeline.models.checkpoint import read_policy_config
from pipeline.stages import RunPaths, stage
from pipeline.tracking.registry import Gate, Registration, best_passing, find_version, register_student, set_aliases
from pipeline.tracking.runs import stage_run
from pipeline.tune.trials import SweepSummary, TrialResult

log = logging.getLogger(__name__)


def candidates(cfg: PipelineConfig) -> tuple[list[TrialResult], float]:
    """Sweep trials plus the pipeline's own student, each with success, compute and action error."""
    paths = RunPaths.of(cfg)
    report = EvaluationReport.read(stage("evaluate").require(paths))
    sweep = SweepSummary.read(stage("sweep").require(paths))
    student = report.policies["student"]
    own = TrialResult(trial="distill", params={"router.budget": cfg.router.budget}, student_uri=str(paths.student),
                      success=student.success, compute_ratio=student.executed_fraction,
                      action_mse_norm=student.action_mse_norm)
    return [own, *sweep.trials], report.policies["teacher"].success


def _teacher_run_id(teacher_hash: str) -> str:
    runs = mlflow.search_runs(filter_string=f"tags.stage = 'train-teacher' and tags.teacher_hash = '{teacher_hash}'",
                              max_results=1, output_format="list")
    return runs[0].info.run_id if runs else ""


def evidence(best: TrialResult, teacher_success: float) -> dict[str, str]:
    card = read_policy_config(best.student_uri)
    return {"success": best.success, "compute_ratio": best.compute_ratio,
            "action_mse_norm": best.action_mse_norm, "teacher_success": teacher_success,
            "student_hash": card.hash, "teacher_hash": card.teacher_hash,
            "teacher_run_id": _teacher_run_id(card.teacher_hash), "data_content_hash": card.data_content_hash,
            "config_digest": card.config_digest, "source": best.trial,
            "params": json.dumps(best.params, sort_keys=True)}


def main(cfg: PipelineConfig) -> Registration | None:
    pool, teacher_success = candidates(cfg)
    gate = Gate(teacher_success, cfg.promote.success_delta, cfg.promote.compute_budget)
    with stage_run(cfg, "promote"):
        best = best_passing(pool, gate)
        mlflow.log_metrics({"candidates": len(pool), "passing": sum(gate.passes(c) for c in pool)})
        if best is None:
            log.warning("no student passes the gate (success >= %.2f - %.2f and compute <= %.2f); "
                        "nothing registered", teacher_success, gate.success_delta, gate.compute_budget)
            return None
        tags = evidence(best, teacher_success)
        version = find_version(mlflow.MlflowClient(), cfg.promote.model_name, tags["student_hash"])
        if version is None:
            version = register_student(cfg.promote.model_name, best, tags)
        else:
            log.info("these weights are already version %s; not registering again", version.version)
        registered = set_aliases(cfg.promote.model_name, version)
        mlflow.set_tags({"model_name": registered.name, "model_version": registered.version,
                         "challenger": registered.challenger, "champion": registered.champion})
    print(f"registered model {registered.name}: version {registered.version} "
          f"(challenger={registered.challenger}, champion={registered.champion}) from {best.trial}")
    return registered


if __name__ == "__main__":
    sys.exit(run_cli(main, "promote"))
