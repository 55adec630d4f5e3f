"""Evaluation reports: JSON, markdown and a per-layer execution-frequency heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib
from pydantic import BaseModel, ConfigDict

matplotlib.use("Agg")  # no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402


class _Record(BaseModel):
    # Keys a model does not name are kept (older or newer reports still read); nothing is changed in place.
    # NaN stays NaN in the JSON, as json.dumps writes it (pydantic's default would write null).
    model_config = ConfigDict(extra="allow", frozen=True, ser_json_inf_nan="constants")


class TaskSuccess(_Record):
    success: float
    episodes: int
    ci95: tuple[float, float]          # Wilson 95% interval
    # Per decoder layer, the fraction of this task's closed-loop calls that ran it: whether a router chooses by
    # task. None in reports written before it existed.
    layer_frequency: list[float] | None = None


class PolicyReport(_Record):
    """One policy's figures in an evaluation: closed loop on the report's seeds, offline on held-out rows."""

    success: float                     # closed-loop success over every task and seed
    episodes: int
    ci95: tuple[float, float]
    per_task: dict[str, TaskSuccess]
    executed_fraction: float           # decoder layers run per call, mean over the closed-loop calls
    layer_frequency: list[float]       # per decoder layer, the fraction of closed-loop calls that ran it
    # per batch-1 call: vision (= vision_tower + projector; those two absent in older reports), backbone, router,
    # action_head, total
    flops: dict[str, float]
    action_mse_norm: float             # held-out rows, normalised action units
    action_mse_raw: float
    heldout_rows: float                # the rows both action errors are measured on
    latency_ms_median: float           # batch-1 calls on the policy's own closed-loop observations
    latency_ms_p90: float
    # Reports written before these figures existed read with None.
    executed_fraction_p90: float | None = None       # 90th percentile of one call's executed fraction
    closed_loop_calls: int | None = None             # the calls executed_fraction, layer_frequency, flops cover
    latency_inputs: int | None = None                # distinct recorded observations the latency calls cycle
    latency_executed_fraction: float | None = None   # layers run by the timed calls themselves


class Ratios(_Record):
    """A policy against the teacher of the same evaluation."""

    backbone_flops_ratio: float
    total_flops_ratio: float
    latency_speedup: float
    success_delta: float


class EvaluationReport(_Record):
    """evaluate's report.json: every policy measured on the same tasks, seeds and held-out rows."""

    tasks: list[str]
    seeds: list[int]
    max_steps: int
    policies: dict[str, PolicyReport]
    ratios: dict[str, Ratios] | None = None    # present when a teacher was evaluated
    measured_on: dict[str, str] | None = None  # figure(s) -> the inputs they were measured on

    @classmethod
    def read(cls, path: Path) -> EvaluationReport:
        return cls.model_validate_json(path.read_text())

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)

    def flat_metrics(self) -> dict[str, float]:
        """teacher/success, student/flops_backbone, student/backbone_flops_ratio, ... for MLflow."""
        out: dict[str, float] = {}
        for name, b in self.policies.items():
            for key in ("success", "executed_fraction", "action_mse_norm", "action_mse_raw",
                        "latency_ms_median", "latency_ms_p90", "executed_fraction_p90", "latency_executed_fraction"):
                if getattr(b, key) is not None:
                    out[f"{name}/{key}"] = float(getattr(b, key))
            for part, value in b.flops.items():
                out[f"{name}/flops_{part}"] = value
        for name, ratios in (self.ratios or {}).items():
            out.update({f"{name}/{k}": v for k, v in ratios.model_dump().items()})
        return out


def summary_table(report: EvaluationReport) -> str:
    """Markdown table: success (95% CI), backbone/total FLOPs per call, latency, layers run."""
    lines = ["| policy | success (95% CI) | backbone MFLOPs/call | total MFLOPs/call | latency ms (median / p90) "
             "| layers run (mean / p90 per call; timed calls) | held-out action MSE |",
             "|---|---|---|---|---|---|---|"]
    for name, b in report.policies.items():
        lo, hi = b.ci95
        layers = f"{b.executed_fraction:.2f}"
        if b.executed_fraction_p90 is not None:
            layers += f" / {b.executed_fraction_p90:.2f}"
        if b.latency_executed_fraction is not None:
            layers += f"; {b.latency_executed_fraction:.2f}"
        lines.append(f"| {name} | {b.success:.2f} ({lo:.2f}-{hi:.2f}, n={b.episodes}) "
                     f"| {b.flops['backbone'] / 1e6:.2f} | {b.flops['total'] / 1e6:.2f} "
                     f"| {b.latency_ms_median:.2f} / {b.latency_ms_p90:.2f} "
                     f"| {layers} | {b.action_mse_norm:.3f} |")
    parts = [(name, b.flops) for name, b in report.policies.items() if "vision_tower" in b.flops]
    if parts:   # reports written before the split lack vision_tower and projector
        lines += ["", "FLOPs per call by part (MFLOPs):"] + [
            f"- {name}: vision tower {f['vision_tower'] / 1e6:.2f}, projector {f['projector'] / 1e6:.2f}, "
            f"decoder {f['backbone'] / 1e6:.2f}, router {f['router'] / 1e6:.2f}, head {f['action_head'] / 1e6:.2f}"
            for name, f in parts]
    for name, r in (report.ratios or {}).items():
        lines.append("")
        lines.append(f"{name} vs teacher: backbone FLOPs x{r.backbone_flops_ratio:.2f}, "
                     f"latency speed-up x{r.latency_speedup:.2f}, success {r.success_delta:+.2f}")
    if report.measured_on:
        lines += ["", "Measured on:"] + [f"- {figures}: {inputs}" for figures, inputs in report.measured_on.items()]
    return "\n".join(lines)


def per_task_table(report: EvaluationReport) -> str:
    names = list(report.policies)
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    missing = TaskSuccess(success=0.0, episodes=0, ci95=(0.0, 1.0))
    for task in report.tasks:
        cells = []
        for name in names:
            t = report.policies[name].per_task.get(task, missing)
            cells.append(f"{t.success:.2f} ({t.ci95[0]:.2f}-{t.ci95[1]:.2f})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def routed_by_task_tables(report: EvaluationReport) -> str:
    """For each policy whose layers depend on the input (some layer runs on some calls but not all), the share of
    each task's calls that ran each layer: a router that chooses by task shows different rows."""
    blocks = []
    for name, policy in report.policies.items():
        if not any(0.0 < f < 1.0 for f in policy.layer_frequency):
            continue
        layers = range(len(policy.layer_frequency))
        lines = [f"### {name}", "", "| task | " + " | ".join(f"L{i}" for i in layers) + " |",
                 "|---|" + "---|" * len(policy.layer_frequency)]
        for task in report.tasks:
            scores = policy.per_task.get(task)
            if scores is not None and scores.layer_frequency is not None:
                lines.append(f"| {task} | " + " | ".join(f"{f:.2f}" for f in scores.layer_frequency) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def heatmap(report: EvaluationReport, path: Path) -> None:
    names = list(report.policies)
    freq = [report.policies[n].layer_frequency for n in names]
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(freq[0]), 0.6 + 0.5 * len(names)))
    im = ax.imshow(freq, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(len(freq[0])), [str(i) for i in range(len(freq[0]))])
    ax.set_xlabel("decoder layer")
    ax.set_title("layer execution frequency (closed loop)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: EvaluationReport, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "report.json", "markdown": folder / "report.md", "heatmap": folder / "layers.png"}
    paths["json"].write_text(report.to_json())
    routed = routed_by_task_tables(report)
    paths["markdown"].write_text("# Evaluation\n\n" + summary_table(report) + "\n\n## Per task\n\n"
                                 + per_task_table(report) + "\n"
                                 + ("\n## Layers run per task (share of the task's calls)\n\n" + routed + "\n"
                                    if routed else ""))
    heatmap(report, paths["heatmap"])
    return paths
