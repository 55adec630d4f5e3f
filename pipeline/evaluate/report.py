"""Evaluation reports: JSON, markdown and a per-layer execution-frequency heatmap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402


def summary_table(report: dict[str, Any]) -> str:
    """Markdown table: success (95% CI), backbone/total FLOPs per call, latency, layers run."""
    lines = ["| policy | success (95% CI) | backbone MFLOPs/call | total MFLOPs/call | latency ms (median / p90) "
             "| layers run | held-out action MSE |",
             "|---|---|---|---|---|---|---|"]
    for name, b in report["policies"].items():
        lo, hi = b["ci95"]
        lines.append(f"| {name} | {b['success']:.2f} ({lo:.2f}-{hi:.2f}, n={b['episodes']}) "
                     f"| {b['flops']['backbone'] / 1e6:.2f} | {b['flops']['total'] / 1e6:.2f} "
                     f"| {b['latency_ms_median']:.2f} / {b['latency_ms_p90']:.2f} "
                     f"| {b['executed_fraction']:.2f} | {b['action_mse_norm']:.3f} |")
    for name, r in report.get("ratios", {}).items():
        lines.append("")
        lines.append(f"{name} vs teacher: backbone FLOPs x{r['backbone_flops_ratio']:.2f}, "
                     f"latency speed-up x{r['latency_speedup']:.2f}, success {r['success_delta']:+.2f}")
    return "\n".join(lines)


def per_task_table(report: dict[str, Any]) -> str:
    names = list(report["policies"])
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in report["tasks"]:
        cells = []
        for name in names:
            t = report["policies"][name]["per_task"].get(task, {"success": 0.0, "ci95": [0.0, 1.0]})
            cells.append(f"{t['success']:.2f} ({t['ci95'][0]:.2f}-{t['ci95'][1]:.2f})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmap(report: dict[str, Any], path: Path) -> None:
    names = list(report["policies"])
    freq = [report["policies"][n]["layer_frequency"] for n in names]
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


def write_report(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "report.json", "markdown": folder / "report.md", "heatmap": folder / "layers.png"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["markdown"].write_text("# Evaluation\n\n" + summary_table(report) + "\n\n## Per task\n\n"
                                 + per_task_table(report) + "\n")
    heatmap(report, paths["heatmap"])
    return paths
