"""What a sweep hands on: one evaluated trial (also the shape of a promotion candidate) and trials.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class TrialResult(BaseModel):
    """A distilled student and its figures from its own evaluation (a sweep trial, or the pipeline's student)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    trial: str                               # the Tune trial name, or "distill" for the pipeline's own student
    params: dict[str, Any]                   # the sampled config values (dotted keys)
    student_uri: str
    success: float                           # closed-loop success on the trial's evaluation episodes
    compute_ratio: float                     # the executed fraction of decoder layers in closed loop
    action_mse_norm: float                   # held-out action error (normalised units)
    latency_ms_median: float | None = None   # batch-1
    mlflow_run_id: str | None = None
    episodes_per_task: int | None = None     # closed-loop episodes per task behind `success` (None: not recorded)
    family: str = "routed"                   # distill.family: routed, static or shallow
    ci95: tuple[float, float] | None = None  # Wilson 95% interval of `success` (None: not recorded)
    eval_seed: int | None = None             # the first of their seeds (evaluate.seed, then one up per episode)


class FailedTrial(BaseModel):
    """A trial that failed past sweep.trial_max_failures: its sampled values and the error, for the summary."""

    params: dict[str, Any]
    error: str


class TeacherPoint(BaseModel):
    success: float
    compute_ratio: float = 1.0
    ci95: tuple[float, float] | None = None


class SweepSummary(BaseModel):
    """sweep's trials.json: the evaluated trials, how many ASHA stopped, the frontier and the teacher's point."""

    model_config = ConfigDict(extra="allow", frozen=True)

    space: str
    trials: list[TrialResult]                # completed trials only: the frontier and promote read these
    stopped_early: int
    frontier: list[str]                      # trial names on the Pareto front, by compute
    teacher: TeacherPoint | None = None      # from the evaluate report, when there was one
    failed: list[FailedTrial] = []           # trials that failed past sweep.trial_max_failures

    @classmethod
    def read(cls, path: Path) -> SweepSummary:
        return cls.model_validate_json(path.read_text())

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)
