"""Benchmark: the headline table (teacher vs ActDistill student) and the ablations, from one config.

    MUJOCO_GL=egl .venv/bin/python bench/headline.py                  # demo.yaml: 72 min to 2.4 h on 2 cores
    MUJOCO_GL=egl .venv/bin/python bench/headline.py --reuse          # keep stages made under the same config
    MUJOCO_GL=egl .venv/bin/python bench/headline.py --replicates 1   # one student, no spread (~47 min)

Runs, in one process and one Ray session: collect -> train-teacher -> probe-teacher -> distill (the
pipeline's own stages, as `actdistill run` runs them), then the same distillation again with other seeds
(run.seed + 1, ...: a different student initialisation of the router and data order, same teacher and
labels), then three ablation students, then ONE `evaluate` over all policies: the same closed-loop seeds,
the same held-out rows, batch-1 latency interleaved across policies. A target counts as met only if every
replicate meets it: one lucky distillation does not make the result. Writes bench/results/headline.{json,md}
and the usual evaluate report (JSON, markdown, layer heatmap) to the run folder and MLflow.

Ablations (docs/method.md), each at the student's compute unless the ablation removes the control:
- no-graph:  distill.objective=action_regression: the final action regressed to the expert's and the
             teacher's, same router and budget, no per-layer graph alignment.
- static:    no router: the same number of layers the routed student ran in training (rounded), evenly
             spaced and ending at the last layer, always run; trained with the full ActDistill loss.
- no-budget: the router trained without the budget term (distill.budget_weight=0).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MUJOCO_GL", "egl")

from jobs import distill, evaluate  # noqa: E402
from pipeline.config import PipelineConfig, load_config, with_overrides  # noqa: E402
from pipeline.evaluate.report import EvaluationReport, Ratios  # noqa: E402
from pipeline.models.router import evenly_spaced_layers  # noqa: E402
from pipeline.ray_runtime import start_ray  # noqa: E402
from pipeline.stages import STAGES, RunPaths, inputs_digest  # noqa: E402

RESULTS = REPO / "bench" / "results"
STATE = "headline_state.json"    # per-stage wall seconds, config digests and the student's fraction (--reuse)

# The headline targets: a teacher worth distilling, within 3 points of it at half the backbone FLOPs and 1.6x faster.
TEACHER_MIN, SUCCESS_DROP, FLOPS_MAX, SPEEDUP_MIN = 0.60, 0.03, 0.50, 1.6


def static_layers(fraction: float, num_layers: int) -> list[int]:
    """The static family's rule (pipeline.models.router.evenly_spaced_layers): 0.45 of 8 -> [1, 3, 5, 7]."""
    return list(evenly_spaced_layers(fraction, num_layers))


def replicate_seeds(seed: int, replicates: int) -> list[int]:
    """Distillation seeds besides the pipeline's own student (run.seed): run.seed + 1, ..."""
    return [seed + i for i in range(1, replicates)]


def ablations(student_fraction: float, num_layers: int) -> dict[str, dict[str, Any]]:
    """name -> dotted overrides of the pipeline config."""
    return {
        "no-graph": {"distill.objective": "action_regression"},
        "static": {"distill.family": "static", "router.static_layers": static_layers(student_fraction, num_layers)},
        "no-budget": {"distill.budget_weight": 0.0},
    }


# The pipeline's own stages the bench runs before its replicates and ablations (pipeline/stages.py order).
MADE = ("collect", "train-teacher", "probe-teacher", "distill")


class Stages:
    """Runs stages in order, timing each; with reuse, a stage whose output exists and whose config inputs
    are those it ran with is skipped and its earlier time (from the run folder) is reported instead, unless a
    stage it needs ran in this process (its inputs changed). By default a stage needs every stage before it."""

    def __init__(self, cfg: PipelineConfig, reuse: bool, state: str = STATE) -> None:
        self.reuse = reuse
        self.path = RunPaths.of(cfg).root / state
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.seconds: dict[str, float] = self.state.setdefault("seconds", {})
        self.digests: dict[str, str] = self.state.setdefault("digests", {})
        self.reused: list[str] = []
        self.ran: list[str] = []

    def run(self, name: str, output: str | Path | None, fn: Callable[[], Any], digest: str | None = None,
            needs: tuple[str, ...] | None = None) -> Any:
        """output None: always run (evaluate: the table must come from one measurement). digest: of the
        config the output depends on; a different (or unrecorded) one means the output is stale. needs: the
        stages whose output this one reads (None: all before it), e.g. one student's evaluation needs its
        distill but not another student's."""
        upstream = self.ran if needs is None else [n for n in self.ran if n in needs]
        if self.reuse and not upstream and output is not None and Path(output).exists() and name in self.seconds:
            if digest is None or self.digests.get(name) == digest:
                print(f"=== {name}: reusing {output} ({self.seconds[name]:.0f} s when it ran)")
                self.reused.append(name)
                return None
            print(f"=== {name}: {output} was made under another config ({self.path.name} digest "
                  f"{self.digests.get(name)}, now {digest}); running it again")
        after = f" (after {upstream[-1]}, which ran in this sitting)" if self.reuse and upstream else ""
        print(f"=== {name}{after}")
        started = time.perf_counter()
        result = fn()
        self.seconds[name] = time.perf_counter() - started
        self.ran.append(name)
        if digest is not None:
            self.digests[name] = digest
        self.save()
        return result

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.state, indent=2))


def run(cfg: PipelineConfig, reuse: bool, replicates: int) -> dict[str, Any]:
    start_ray(cfg)
    stages, paths = Stages(cfg, reuse), RunPaths.of(cfg)
    made = {}
    for step in (s for s in STAGES if s.name in MADE):
        job = importlib.import_module(f"jobs.{step.job}")
        made[step.name] = stages.run(step.name, step.done_file(paths), lambda job=job: job.main(cfg),
                                     inputs_digest(cfg, step.name))
    if made["distill"] is not None:   # the routed student's executed fraction at the end of training
        stages.state["student_fraction"] = float(made["distill"].metrics["final_executed_fraction"])
        stages.save()
    if "student_fraction" not in stages.state:
        raise SystemExit(f"{stages.path} does not record the student's executed fraction (the student was not "
                         f"made by this bench); run without --reuse")
    fraction = stages.state["student_fraction"]
    variants = ablations(fraction, cfg.model.num_layers)
    # policy name -> (stage and MLflow run name, folder under run_dir, overrides): replicates, then ablations
    replicas = {f"student-seed{s}": (f"replicate seed {s}", f"replicates/seed{s}", {"run.seed": s})
                for s in replicate_seeds(cfg.run.seed, replicates)}
    others = {name: (f"ablation {name}", f"ablations/{name}", overrides) for name, overrides in variants.items()}
    extra = {}
    for name, (label, folder, overrides) in {**replicas, **others}.items():
        uri, variant = paths.root / folder, with_overrides(cfg, overrides)
        stages.run(label, uri / "model.safetensors",
                   lambda v=variant, u=uri, n=label: distill.main(v, student_uri=str(u), run_name=n),
                   inputs_digest(variant, "distill"))
        extra[name] = folder
    students = ["student", *replicas]
    report = stages.run("evaluate", None,
                        lambda: evaluate.main(with_overrides(cfg, {"evaluate.extra": extra})))
    return {"report": report, "seconds": stages.seconds, "reused": stages.reused, "student_fraction": fraction,
            "ablations": variants, "students": students}


LABELS = {"teacher": "teacher (all layers)", "no-graph": "(a) no graph supervision",
          "static": "(b) static layer dropping", "no-budget": "(c) router without budget"}


def _label(name: str, seed: int) -> str:
    """`student` is the pipeline's own student (run.seed), `student-seed<k>` a replicate."""
    if name == "student" or name.startswith("student-seed"):
        tag = seed if name == "student" else name.removeprefix("student-seed")
        return f"ActDistill student (seed {tag})"
    return LABELS.get(name, name)


def table(report: EvaluationReport, seed: int = 0) -> str:
    """One row per policy: what each part of the method buys, against the same teacher episodes."""
    rows = ["| policy | success (95% CI) | vs teacher | backbone FLOPs | total FLOPs | latency speed-up "
            "| layers run | held-out action MSE |", "|---|---|---|---|---|---|---|---|"]
    itself = Ratios(success_delta=0.0, backbone_flops_ratio=1.0, total_flops_ratio=1.0, latency_speedup=1.0)
    for name, b in report.policies.items():
        r = (report.ratios or {}).get(name, itself)
        lo, hi = b.ci95
        rows.append(f"| {_label(name, seed)} | {b.success:.3f} ({lo:.2f}-{hi:.2f}, n={b.episodes}) "
                    f"| {100 * r.success_delta:+.1f} pts | x{r.backbone_flops_ratio:.2f} "
                    f"| x{r.total_flops_ratio:.2f} | x{r.latency_speedup:.2f} "
                    f"| {b.executed_fraction:.2f} | {b.action_mse_norm:.4f} |")
    return "\n".join(rows)


def checks(report: EvaluationReport, students: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The headline targets; a student target is met only if every replicate meets it. `value` is the
    worst replicate's figure, `values` all of them in the order of `students`."""
    teacher, students = report.policies["teacher"], students or ["student"]
    targets = {  # name -> (ratio key, the worst of several values, passes)
        "student success >= teacher - 3 pts": ("success_delta", min, lambda v: v >= -SUCCESS_DROP - 1e-9),
        "student backbone FLOPs <= 50% of teacher": ("backbone_flops_ratio", max, lambda v: v <= FLOPS_MAX),
        "student batch-1 latency >= 1.6x lower": ("latency_speedup", min, lambda v: v >= SPEEDUP_MIN),
    }
    out = {"teacher success >= 0.60": {"value": teacher.success, "values": [teacher.success],
                                       "ok": teacher.success >= TEACHER_MIN}}
    ratios = report.ratios or {}
    for name, (key, worst, passes) in targets.items():
        values = [getattr(ratios[s], key) for s in students]
        out[name] = {"value": worst(values), "values": values, "ok": all(passes(v) for v in values)}
    return out


def machine() -> dict[str, Any]:
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"cpus": os.cpu_count(), "ram_gib": round(mem_kb / 2**20, 1), "python": platform.python_version(),
            "load_avg_at_end": os.getloadavg()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "jobs/configs/demo.yaml"))
    parser.add_argument("--reuse", action="store_true",
                        help="skip stages whose output exists in the run folder, made under the same config")
    parser.add_argument("--replicates", type=int, default=3,
                        help="students distilled with seeds run.seed, run.seed + 1, ...; each must meet the targets")
    parser.add_argument("--out", default=str(RESULTS / "headline"))
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. evaluate.episodes_per_task=5")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    if args.replicates < 1:
        parser.error(f"--replicates {args.replicates}: distil at least one student, e.g. --replicates 3")
    out = run(cfg, args.reuse, args.replicates)
    report = out["report"]
    verdict = checks(report, out["students"])
    seconds = out["seconds"]
    total = sum(seconds.values())
    pipeline_s = sum(seconds[s] for s in ("collect", "train-teacher", "probe-teacher", "distill", "evaluate"))
    lines = [f"# Headline result: `{cfg.run.name}` ({len(report.tasks)} tasks x "
             f"{len(report.seeds)} episodes, seeds {report.seeds[0]}-{report.seeds[-1]})", "",
             table(report, cfg.run.seed), "",
             f"| target | worst of {len(out['students'])} student(s) | every student | met |", "|---|---|---|---|",
             *[f"| {k} | {v['value']:.3f} | {', '.join(f'{x:.3f}' for x in v['values'])} "
               f"| {'yes' if v['ok'] else 'NO'} |" for k, v in verdict.items()], "",
             f"Static ablation layers: {out['ablations']['static']['router.static_layers']} (the student ran "
             f"{out['student_fraction']:.2f} of the layers at the end of training).", "",
             "Wall seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
             + f"; pipeline (collect to evaluate) {pipeline_s / 60:.1f} min; everything {total / 60:.1f} min"
             + (f" (reused from an earlier run: {', '.join(out['reused'])})" if out["reused"] else ""), "",
             f"Machine: {machine()}"]
    text = "\n".join(lines)
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(text + "\n")
    Path(args.out + ".json").write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                                    "checks": verdict, "students": out["students"],
                                                    "seconds": seconds, "reused": out["reused"],
                                                    "ablations": out["ablations"], "machine": machine(),
                                                    "report": report.model_dump(mode="json")}, indent=2))
    print(f"wrote {args.out}.md and {args.out}.json")
    return 0 if all(v["ok"] for v in verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
