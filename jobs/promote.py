"""The promote job: gate the sweep's students against the teacher and register the best in MLflow."""

from __future__ import annotations

import json
import logging
import sys
from typing import NamedTuple

import mlflow

from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.evaluate.report import EvaluationReport
from pipeline.evaluate.suite import evaluate_policies
from pipeline.models.checkpoint import read_policy_config
from pipeline.ray_runtime import start_ray
from pipeline.stages import RunPaths, stage
from pipeline.tracking.registry import Gate, Registration, find_or_register, ranked_passing, set_aliases
from pipeline.tracking.runs import stage_run
from pipeline.tune.trials import SweepSummary, TrialResult

log = logging.getLogger(__name__)


class TeacherEpisodes(NamedTuple):
    """The closed-loop episodes behind the teacher's success: per task, and the first of their seeds."""

    per_task: int
    first_seed: int


def candidates(cfg: PipelineConfig) -> tuple[list[TrialResult], float, TeacherEpisodes]:
    """Sweep trials plus the pipeline's own student, each with success, compute and action error; the
    teacher's success and the episodes it was measured on."""
    paths = RunPaths.of(cfg)
    report = EvaluationReport.read(stage("evaluate").require(paths))
    sweep = SweepSummary.read(stage("sweep").require(paths))
    student, teacher = report.policies["student"], report.policies["teacher"]
    episodes = TeacherEpisodes(teacher.episodes // max(1, len(report.tasks)), report.seeds[0])
    own = TrialResult(trial="distill", params={"router.budget": cfg.router.budget}, student_uri=str(paths.student),
                      success=student.success, compute_ratio=student.executed_fraction,
                      action_mse_norm=student.action_mse_norm, latency_ms_median=student.latency_ms_median,
                      episodes_per_task=episodes.per_task, eval_seed=episodes.first_seed,
                      family=cfg.distill.family, ci95=student.ci95)
    return [own, *sweep.trials], teacher.success, episodes


def on_teachers_episodes(candidate: TrialResult, teacher: TeacherEpisodes) -> bool:
    """Whether the candidate's figures come from the very episodes and seeds the teacher's success does."""
    return (candidate.episodes_per_task, candidate.eval_seed) == teacher


def reevaluated(cfg: PipelineConfig, candidate: TrialResult, teacher: TeacherEpisodes) -> TrialResult:
    """The candidate measured again on the teacher's episodes and seeds (same count); the sweep's figures are
    kept beside the new ones. A trial ranked best on 1 episode per task is the luckiest as often as the best:
    the gate must not compare that draw with a teacher measured on 20."""
    if on_teachers_episodes(candidate, teacher):
        return candidate
    log.info("re-evaluating %s on the teacher's %d episodes per task (its success %.2f came from %s)",
             candidate.trial, teacher.per_task, candidate.success,
             f"{candidate.episodes_per_task} per task" if candidate.episodes_per_task else "an unrecorded count")
    same = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"seed": teacher.first_seed})})
    block = evaluate_policies(same, {candidate.trial: candidate.student_uri},
                              teacher.per_task).policies[candidate.trial]
    sweep = {"sweep_success": candidate.success, "sweep_compute_ratio": candidate.compute_ratio,
             "sweep_episodes_per_task": candidate.episodes_per_task}
    return candidate.model_copy(update={
        "success": block.success, "compute_ratio": block.executed_fraction,
        "action_mse_norm": block.action_mse_norm, "latency_ms_median": block.latency_ms_median,
        "episodes_per_task": teacher.per_task, "eval_seed": teacher.first_seed, "ci95": block.ci95, **sweep})


def confirmed(cfg: PipelineConfig, shortlist: list[TrialResult], gate: Gate, teacher: TeacherEpisodes
              ) -> TrialResult | None:
    """The first of the shortlist (the best by their own figures, in rank order) that still passes the gate
    when measured on the teacher's episodes."""
    for candidate in shortlist:
        measured = reevaluated(cfg, candidate, teacher)
        mlflow.log_metrics({f"{candidate.trial}/success": measured.success,
                            f"{candidate.trial}/compute_ratio": measured.compute_ratio})
        if gate.passes(measured):
            return measured
        log.warning("%s passed on its sweep figures (success %.2f) but not on the teacher's episodes "
                    "(success %.2f, compute %.2f)", candidate.trial, candidate.success, measured.success,
                    measured.compute_ratio)
    return None


def _teacher_run_id(teacher_hash: str) -> str:
    runs = mlflow.search_runs(filter_string=f"tags.stage = 'train-teacher' and tags.teacher_hash = '{teacher_hash}'",
                              max_results=1, output_format="list")
    return runs[0].info.run_id if runs else ""


def evidence(best: TrialResult, teacher_success: float, teacher_episodes: int) -> dict[str, str]:
    """The version's tags: the figures the gate used (on the teacher's episodes) and, when the candidate was
    re-evaluated, the sweep's figures it was chosen on."""
    card = read_policy_config(best.student_uri)
    extra = best.model_extra or {}
    tags = {"success": best.success, "compute_ratio": best.compute_ratio,
            "action_mse_norm": best.action_mse_norm, "teacher_success": teacher_success,
            "episodes_per_task": best.episodes_per_task, "teacher_episodes_per_task": teacher_episodes,
            "student_hash": card.hash, "teacher_hash": card.teacher_hash,
            "teacher_run_id": _teacher_run_id(card.teacher_hash), "data_content_hash": card.data_content_hash,
            "config_digest": card.config_digest, "source": best.trial, "family": best.family,
            "params": json.dumps(best.params, sort_keys=True)}
    tags.update({k: extra[k] for k in ("sweep_success", "sweep_compute_ratio", "sweep_episodes_per_task")
                 if k in extra})
    return tags


def main(cfg: PipelineConfig) -> Registration | None:
    pool, teacher_success, teacher = candidates(cfg)
    gate = Gate(teacher_success, cfg.promote.success_delta, cfg.promote.compute_budget)
    shortlist = ranked_passing(pool, gate, cfg.promote.prefer)[:cfg.promote.reevaluate_top]
    if any(not on_teachers_episodes(c, teacher) for c in shortlist):
        start_ray(cfg)   # closed-loop re-evaluation runs on Ray actors
    with stage_run(cfg, "promote"):
        mlflow.log_metrics({"candidates": len(pool), "passing": sum(gate.passes(c) for c in pool)})
        best = confirmed(cfg, shortlist, gate, teacher)
        if best is None:
            log.warning("no student passes the gate (success >= %.2f - %.2f and compute <= %.2f on the teacher's "
                        "episodes); nothing registered", teacher_success, gate.success_delta, gate.compute_budget)
            return None
        tags = evidence(best, teacher_success, teacher.per_task)
        version = find_or_register(cfg.promote.model_name, best, tags, cfg.tracking.outage_limit_s)
        registered = set_aliases(cfg.promote.model_name, version, cfg.promote.prefer)
        mlflow.set_tags({"model_name": registered.name, "model_version": registered.version,
                         "challenger": registered.challenger, "champion": registered.champion})
    print(f"registered model {registered.name}: version {registered.version} "
          f"(challenger={registered.challenger}, champion={registered.champion}) from {best.trial}")
    return registered


if __name__ == "__main__":
    sys.exit(run_cli(main, "promote"))
