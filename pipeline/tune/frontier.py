"""The compute/success frontier over sweep trials: Pareto set, table and plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.tune.trials import TeacherPoint, TrialResult  # noqa: E402


def pareto(trials: list[TrialResult]) -> list[TrialResult]:
    """Trials no other trial beats on both axes (lower compute, higher success), by compute."""
    front = []
    for t in trials:
        dominated = any(o.compute_ratio <= t.compute_ratio and o.success >= t.success
                        and (o.compute_ratio < t.compute_ratio or o.success > t.success)
                        for o in trials)
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: t.compute_ratio)


def frontier_table(trials: list[TrialResult], front: list[TrialResult]) -> str:
    on_front = {t.trial for t in front}
    lines = ["| trial | params | compute ratio | success | held-out action MSE | latency ms | frontier |",
             "|---|---|---|---|---|---|---|"]
    for t in sorted(trials, key=lambda t: t.compute_ratio):
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        latency = f"{t.latency_ms_median:.2f}" if t.latency_ms_median is not None else "-"
        lines.append(f"| {t.trial} | {params} | {t.compute_ratio:.2f} | {t.success:.2f} "
                     f"| {t.action_mse_norm:.3f} | {latency} | {'yes' if t.trial in on_front else ''} |")
    return "\n".join(lines)


def frontier_plot(trials: list[TrialResult], front: list[TrialResult], teacher: TeacherPoint | None,
                  path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([t.compute_ratio for t in trials], [t.success for t in trials], label="trials", alpha=0.6)
    ax.plot([t.compute_ratio for t in front], [t.success for t in front], "o-", label="frontier")
    if teacher is not None:
        ax.scatter([teacher.compute_ratio], [teacher.success], marker="*", s=200, label="teacher")
    ax.set_xlabel("backbone compute vs teacher")
    ax.set_ylabel("closed-loop success")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
