"""The compute/success frontier over sweep trials: Pareto set, table and plot, by student family."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.tune.trials import TeacherPoint, TrialResult  # noqa: E402

FAMILIES = ("routed", "static", "shallow")   # distill.family; the plot's order and markers
MARKERS = {"routed": "o", "static": "s", "shallow": "^"}
FAMILY_OFFSET = 0.012   # x offset between families in the plot (compute ratio units)


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


def _interval(ci95: tuple[float, float] | None) -> str:
    return f"{ci95[0]:.2f}-{ci95[1]:.2f}" if ci95 is not None else "-"


def frontier_table(trials: list[TrialResult], front: list[TrialResult], teacher: TeacherPoint | None = None) -> str:
    """One row per trial (and the teacher's first when known), by compute: family, sampled values, compute,
    success with its 95% interval, held-out error, latency, and whether it is on the Pareto front."""
    on_front = {t.trial for t in front}
    lines = ["| trial | family | params | compute ratio | success | 95% CI | held-out action MSE | latency ms "
             "| frontier |", "|---|---|---|---|---|---|---|---|---|"]
    if teacher is not None:
        lines.append(f"| teacher | dense | | {teacher.compute_ratio:.2f} | {teacher.success:.2f} "
                     f"| {_interval(teacher.ci95)} | | | |")
    for t in sorted(trials, key=lambda t: (t.compute_ratio, FAMILIES.index(t.family) if t.family in FAMILIES else 9)):
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        latency = f"{t.latency_ms_median:.2f}" if t.latency_ms_median is not None else "-"
        lines.append(f"| {t.trial} | {t.family} | {params} | {t.compute_ratio:.2f} | {t.success:.2f} "
                     f"| {_interval(t.ci95)} | {t.action_mse_norm:.3f} | {latency} "
                     f"| {'yes' if t.trial in on_front else ''} |")
    return "\n".join(lines)


def _errorbars(points: list[TrialResult] | list[TeacherPoint]) -> list[list[float]] | None:
    """Asymmetric y error bars from each point's 95% interval; None when a point has none."""
    if any(p.ci95 is None for p in points):
        return None
    return [[max(0.0, p.success - p.ci95[0]) for p in points], [max(0.0, p.ci95[1] - p.success) for p in points]]


def frontier_plot(trials: list[TrialResult], front: list[TrialResult], teacher: TeacherPoint | None,
                  path: Path) -> None:
    """Success against backbone compute: each family its own marker with 95% intervals, the Pareto front as a
    line, the teacher as a star. Families are drawn a little apart (FAMILY_OFFSET each) so that students of
    several families at one budget do not hide one another; the front is drawn at the true compute."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    families = [f for f in FAMILIES if any(t.family == f for t in trials)]
    families += sorted({t.family for t in trials} - set(families))
    for i, family in enumerate(families):
        points = sorted((t for t in trials if t.family == family), key=lambda t: t.compute_ratio)
        dx = (i - (len(families) - 1) / 2) * FAMILY_OFFSET
        ax.errorbar([t.compute_ratio + dx for t in points], [t.success for t in points], yerr=_errorbars(points),
                    fmt=MARKERS.get(family, "D"), capsize=3, alpha=0.75, label=family)
    ax.plot([t.compute_ratio for t in front], [t.success for t in front], "-", color="grey", alpha=0.6,
            label="frontier")
    if teacher is not None:
        ax.errorbar([teacher.compute_ratio], [teacher.success], yerr=_errorbars([teacher]), fmt="*",
                    markersize=14, capsize=3, color="black", label="teacher")
    ax.set_xlabel("backbone compute vs teacher (layers run per call; families side by side)")
    ax.set_ylabel("closed-loop success (95% CI)")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
