"""Benchmark: does routing pay? Routed, static and shallow students at equal budgets against one teacher.

    MUJOCO_GL=egl .venv/bin/python bench/frontier.py                # jobs/configs/frontier.yaml: hours on 2 cores
    MUJOCO_GL=egl .venv/bin/python bench/frontier.py --reuse        # continue from the stages already done
    MUJOCO_GL=egl .venv/bin/python bench/frontier.py --smoke        # every step at smoke size (~15 min)
    MUJOCO_GL=egl .venv/bin/python bench/frontier.py --so-far       # the table of what is recorded; runs nothing

Runs collect -> train-teacher -> probe-teacher (the pipeline's own stages), then, per budget, the three student
families (distill.family) with several distillation seeds: routed (3 seeds; router.select=topk runs exactly
round(budget x L) layers per call, a threshold router is calibrated on its own closed-loop calls when
router.calibrate_episodes > 0), static and shallow (2 seeds each; the same round(budget x L) evenly spaced
layers), the baselines first. Each student is evaluated right after its distill, every policy on the
same closed-loop seeds (evaluate.episodes_per_task per task); the teacher too. Every stage is recorded in the run
folder with its wall time and config digest, so --reuse continues an interrupted study over several sittings.
The last step always runs: batch-1 and batch-8 latency of every policy, calls interleaved across policies, on
each policy's own closed-loop observations. Writes bench/results/frontier.{md,json,png}.

Targets (the paper's claim): the routed student within 3 points of the teacher at <= 30% of its backbone FLOPs,
and at least 5 points above the static and shallow students at the same budget, with 95% intervals that do not
overlap. A family's figure at a budget pools its seeds' episodes (one Wilson interval over all of them).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MUJOCO_GL", "egl")

from bench.headline import Stages, machine  # noqa: E402
from jobs import distill  # noqa: E402
from pipeline.config import PipelineConfig, load_config, with_overrides  # noqa: E402
from pipeline.evaluate.metrics import wilson_interval  # noqa: E402
from pipeline.evaluate.policy import Policy  # noqa: E402
from pipeline.evaluate.report import PolicyReport  # noqa: E402
from pipeline.evaluate.rollout import recorded_calls, run_closed_loop  # noqa: E402
from pipeline.evaluate.suite import evaluate_policies, paired_latency, spread  # noqa: E402
from pipeline.ray_runtime import start_ray  # noqa: E402
from pipeline.stages import STAGES, RunPaths, inputs_digest  # noqa: E402
from pipeline.tune.frontier import FAMILIES, frontier_plot, pareto  # noqa: E402
from pipeline.tune.trials import TeacherPoint, TrialResult  # noqa: E402

RESULTS = REPO / "bench" / "results"
STATE = "frontier_state.json"
SEEDS = {"routed": 3, "static": 2, "shallow": 2}   # distillation seeds per family: run.seed, run.seed + 1, ...
BUDGETS = (0.25, 0.375)
SUCCESS_DROP, FLOPS_MAX, MARGIN = 0.03, 0.30, 0.05
LATENCY_BATCHES = (1, 8)
MADE = ("collect", "train-teacher", "probe-teacher")   # the pipeline's own stages before the students
# The smoke size: the smoke config's tiny models with the study's top-k routing, 2 tasks, 1 seed per family, 1 budget,
# short episodes.
SMOKE = ["run.run_dir=runs/frontier-smoke", "run.name=frontier-smoke", "evaluate.episodes_per_task=2",
         "evaluate.max_steps=30", "evaluate.latency_calls=5", "router.select=topk", "router.budget_scope=input"]
SMOKE_SEEDS, SMOKE_BUDGETS = {"routed": 1, "static": 1, "shallow": 1}, (0.5,)


def parse_budgets(text: str | None, default: tuple[float, ...]) -> tuple[float, ...]:
    """--budgets 0.25,0.375 -> (0.25, 0.375); each in (0, 1]."""
    if text is None:
        return default
    try:
        budgets = tuple(float(b) for b in text.split(","))
    except ValueError:
        raise SystemExit(f"--budgets {text!r}: expected comma-separated fractions, e.g. 0.25,0.375") from None
    if not budgets or not all(0 < b <= 1 for b in budgets):
        raise SystemExit(f"--budgets {text!r}: every budget must be in (0, 1], e.g. 0.25,0.375")
    return budgets


def parse_seeds(text: str | None, default: dict[str, int]) -> dict[str, int]:
    """--seeds routed=1,static=1 -> those counts, families not named keep 0 (a family at 0 is left out)."""
    if text is None:
        return default
    seeds = dict.fromkeys(FAMILIES, 0)
    for item in text.split(","):
        family, _, count = item.partition("=")
        if family not in seeds or not count.isdigit():
            raise SystemExit(f"--seeds {text!r}: expected FAMILY=COUNT pairs with FAMILY in {', '.join(FAMILIES)}, "
                             f"e.g. routed=1,static=1")
        seeds[family] = int(count)
    if not seeds.get("routed"):
        raise SystemExit(f"--seeds {text!r}: the study compares against the routed student; give it routed=1 or more")
    return seeds


def students(cfg: PipelineConfig, budgets: tuple[float, ...], seeds: dict[str, int]) -> dict[str, dict[str, Any]]:
    """policy name -> the dotted overrides that make it, e.g. routed-0.25-s1: family, budget and seed."""
    return {f"{family}-{budget:g}-s{cfg.run.seed + i}": {"distill.family": family, "router.budget": budget,
                                                         "run.seed": cfg.run.seed + i}
            for budget in budgets for family in FAMILIES for i in range(seeds[family])}


def evaluated(cfg: PipelineConfig, stages: Stages, name: str, uri: str, needs: tuple[str, ...] = MADE
              ) -> PolicyReport:
    """One policy's closed-loop, offline and compute figures on the config's evaluation seeds, kept in the run
    folder (frontier/evals/NAME.json) so a later sitting reads them instead of rolling out again; rolled out
    again when a stage it `needs` (the teacher's, or the student's own distill) ran in this sitting."""
    path = eval_record(cfg, name)

    def run() -> None:
        block = evaluate_policies(cfg, {name: uri}, cfg.evaluate.episodes_per_task).policies[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.model_dump_json(indent=2))

    stages.run(f"evaluate {name}", path, run, eval_digest(cfg, uri), needs)
    return PolicyReport.model_validate_json(path.read_text())


def student_folder(cfg: PipelineConfig, name: str) -> Path:
    """Where a student of the study is distilled to in the run folder (its evaluation's digest names it)."""
    return RunPaths.of(cfg).root / "frontier" / name


def eval_record(cfg: PipelineConfig, name: str) -> Path:
    """Where a policy's evaluation is kept in the run folder."""
    return RunPaths.of(cfg).root / "frontier" / "evals" / f"{name}.json"


def eval_digest(cfg: PipelineConfig, uri: str | Path) -> str:
    """What an evaluation depends on: the evaluation settings and the policy it rolled out."""
    return f"{inputs_digest(cfg, 'evaluate')}:{uri}"


def latencies(cfg: PipelineConfig, uris: dict[str, str]) -> dict[str, dict[int, dict[str, float]]]:
    """name -> batch -> latency figures: calls interleaved across all policies in one pass, on observations
    recorded from each policy's own closed-loop episodes (1 per task, on the evaluation's first seed)."""
    results = run_closed_loop(uris, cfg.collect.tasks, [cfg.evaluate.seed], cfg.collect.image_size,
                              cfg.collect.camera, cfg.evaluate.max_steps, cfg.evaluate.num_workers,
                              cfg.evaluate.envs_per_worker)
    policies = {name: Policy(uri) for name, uri in uris.items()}
    own = {name: spread(recorded_calls(results, name), max(LATENCY_BATCHES) * 8) for name in uris}
    return {name: {b: figures[name] for b, figures in
                   ((b, paired_latency(policies, own, cfg.evaluate.latency_calls, cfg.evaluate.latency_threads, b))
                    for b in LATENCY_BATCHES)}
            for name in uris}


def pooled(blocks: list[PolicyReport]) -> tuple[float, tuple[float, float], int]:
    """Success over every episode of several seeds' students, its Wilson interval and the episode count."""
    wins = sum(round(b.success * b.episodes) for b in blocks)
    episodes = sum(b.episodes for b in blocks)
    return wins / episodes, wilson_interval(wins, episodes), episodes


def family_rows(made: dict[str, dict[str, Any]], blocks: dict[str, PolicyReport], teacher: PolicyReport
                ) -> list[dict[str, Any]]:
    """One row per (budget, family): pooled success, its interval, and mean measured compute over the seeds."""
    rows = []
    for budget in sorted({o["router.budget"] for o in made.values()}):
        for family in FAMILIES:
            names = [n for n, o in made.items() if o["router.budget"] == budget and o["distill.family"] == family]
            if not names:
                continue
            success, ci95, episodes = pooled([blocks[n] for n in names])
            rows.append({"budget": budget, "family": family, "names": names, "seeds": len(names), "success": success,
                         "ci95": ci95, "episodes": episodes,
                         "seed_success": [blocks[n].success for n in names],
                         "seed_executed": [blocks[n].executed_fraction for n in names],
                         "executed_fraction": sum(blocks[n].executed_fraction for n in names) / len(names),
                         "backbone_flops_ratio": sum(blocks[n].flops["backbone"] for n in names)
                         / len(names) / teacher.flops["backbone"]})
    return rows


def verdict(rows: list[dict[str, Any]], teacher: PolicyReport) -> dict[str, dict[str, Any]]:
    """The study's targets per budget: routed near the teacher at <= 30% backbone FLOPs, and clearly above both
    baselines (5 points, intervals apart)."""
    out = {}
    for budget in sorted({r["budget"] for r in rows}):
        at = {r["family"]: r for r in rows if r["budget"] == budget}
        if "routed" not in at:
            continue
        routed = at["routed"]
        out[f"budget {budget:g}: routed within {SUCCESS_DROP * 100:.0f} pts of the teacher"] = {
            "value": routed["success"] - teacher.success, "ok": routed["success"] >= teacher.success - SUCCESS_DROP}
        out[f"budget {budget:g}: routed backbone FLOPs <= {FLOPS_MAX:.0%}"] = {
            "value": routed["backbone_flops_ratio"], "ok": routed["backbone_flops_ratio"] <= FLOPS_MAX}
        for other in ("static", "shallow"):
            if other in at:
                gap = routed["success"] - at[other]["success"]
                apart = routed["ci95"][0] > at[other]["ci95"][1]
                out[f"budget {budget:g}: routed >= {other} + {MARGIN * 100:.0f} pts, intervals apart"] = {
                    "value": gap, "ok": gap >= MARGIN and apart}
        for family, row in at.items():   # the budget held in closed loop by every seed: the worst seed's miss
            miss = max((f - budget for f in row["seed_executed"]), key=abs)
            out[f"budget {budget:g}: every {family} seed runs its budget in closed loop (+-0.03)"] = {
                "value": miss, "ok": abs(miss) <= 0.03}
    return out


def table(rows: list[dict[str, Any]], teacher: PolicyReport, lat: dict[str, dict[int, dict[str, float]]]) -> str:
    """Families by budget against the teacher; latency speed-ups are the mean over a family's seeds."""
    def speedup(names: list[str], batch: int) -> str:
        if not all(n in lat for n in ["teacher", *names]):   # --so-far: no latency pass
            return "-"
        base = lat["teacher"][batch]["latency_ms_median"]
        return f"x{sum(base / lat[n][batch]['latency_ms_median'] for n in names) / len(names):.2f}"

    head = ["| budget | family | seeds | success (95% CI, episodes) | per seed | layers run (per seed) "
            "| backbone FLOPs | speed-up b1 | speed-up b8 |", "|---|---|---|---|---|---|---|---|---|"]
    t_lo, t_hi = teacher.ci95
    head.append(f"| - | teacher | - | {teacher.success:.3f} ({t_lo:.2f}-{t_hi:.2f}, {teacher.episodes}) | | 1.00 "
                f"| x1.00 | x1.00 | x1.00 |")
    for r in rows:
        names = r["names"]
        lo, hi = r["ci95"]
        head.append(f"| {r['budget']:g} | {r['family']} | {r['seeds']} | {r['success']:.3f} ({lo:.2f}-{hi:.2f}, "
                    f"{r['episodes']}) | {', '.join(f'{s:.2f}' for s in r['seed_success'])} "
                    f"| {r['executed_fraction']:.3f} ({', '.join(f'{f:.3f}' for f in r['seed_executed'])}) "
                    f"| x{r['backbone_flops_ratio']:.2f} | {speedup(names, 1)} "
                    f"| {speedup(names, 8)} |")
    return "\n".join(head)


def run(cfg: PipelineConfig, reuse: bool, budgets: tuple[float, ...], seeds: dict[str, int]) -> dict[str, Any]:
    start_ray(cfg)
    stages, paths = Stages(cfg, reuse, STATE), RunPaths.of(cfg)
    for step in (s for s in STAGES if s.name in MADE):
        job = importlib.import_module(f"jobs.{step.job}")
        stages.run(step.name, step.done_file(paths), lambda job=job: job.main(cfg), inputs_digest(cfg, step.name))
    blocks = {"teacher": evaluated(cfg, stages, "teacher", str(paths.teacher))}
    made = students(cfg, budgets, seeds)
    uris = {"teacher": str(paths.teacher)}
    # The baselines first: they do not depend on the router's recipe, which a later sitting may still change.
    # Students are independent of one another: one distilled in this sitting leaves the others' records valid.
    for name, overrides in sorted(made.items(), key=lambda item: item[1]["distill.family"] == "routed"):
        variant = with_overrides(cfg, overrides)
        uri = student_folder(variant, name)
        stages.run(f"distill {name}", uri / "model.safetensors",
                   lambda v=variant, u=uri, n=name: distill.main(v, student_uri=str(u), run_name=f"frontier {n}"),
                   inputs_digest(variant, "distill"), MADE)
        blocks[name] = evaluated(variant, stages, name, str(uri), (f"distill {name}", *MADE))
        uris[name] = str(uri)
    started = time.perf_counter()
    lat = latencies(cfg, uris)
    stages.seconds["latency"] = time.perf_counter() - started
    stages.save()
    return {"blocks": blocks, "made": made, "latency": lat, "seconds": stages.seconds, "reused": stages.reused}


def recorded(cfg: PipelineConfig, budgets: tuple[float, ...], seeds: dict[str, int]) -> dict[str, Any]:
    """--so-far: the teacher's and the students' evaluations recorded in the run folder under the current config
    (the digests --reuse checks), for a table of the study while it is still under way; runs nothing."""
    stages, paths = Stages(cfg, True, STATE), RunPaths.of(cfg)

    def valid(variant: PipelineConfig, name: str, uri: Path) -> PolicyReport | None:
        path = eval_record(variant, name)
        if not path.exists() or stages.digests.get(f"evaluate {name}") != eval_digest(variant, uri):
            return None
        if name != "teacher" and stages.digests.get(f"distill {name}") != inputs_digest(variant, "distill"):
            return None
        return PolicyReport.model_validate_json(path.read_text())

    for step in MADE:
        if stages.digests.get(step) != inputs_digest(cfg, step):
            raise SystemExit(f"--so-far: {stages.path} has no {step} made under this config; nothing to tabulate "
                             f"yet (run the study first: bench/frontier.py --reuse)")
    teacher = valid(cfg, "teacher", paths.teacher)
    if teacher is None:
        raise SystemExit(f"--so-far: the teacher's evaluation is not recorded in {stages.path} yet")
    planned, made, blocks = students(cfg, budgets, seeds), {}, {"teacher": teacher}
    for name, overrides in planned.items():
        variant = with_overrides(cfg, overrides)
        block = valid(variant, name, student_folder(variant, name))
        if block is not None:
            made[name], blocks[name] = overrides, block
    missing = [name for name in planned if name not in made]
    seconds = {k: v for k, v in stages.seconds.items() if k != "latency"}
    return {"blocks": blocks, "made": made, "latency": {}, "seconds": seconds, "reused": list(seconds),
            "missing": missing}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="default: jobs/configs/frontier.yaml (smoke.yaml with --smoke)")
    parser.add_argument("--reuse", action="store_true",
                        help="continue: skip stages whose output exists in the run folder, made under the same config")
    parser.add_argument("--smoke", action="store_true", help="every step at smoke size, one seed per family")
    parser.add_argument("--so-far", action="store_true",
                        help="run nothing: tabulate the evaluations recorded so far (no latency) into OUT-so-far")
    parser.add_argument("--out", default=None, help="default: bench/results/frontier (frontier-smoke with --smoke)")
    parser.add_argument("--budgets", default=None, help="comma-separated, e.g. 0.25 (default: 0.25,0.375)")
    parser.add_argument("--seeds", default=None,
                        help="distillation seeds per family, e.g. routed=1,static=1,shallow=0 (default: 3/2/2)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. evaluate.episodes_per_task=20")
    args = parser.parse_args()
    config = args.config or str(REPO / "jobs/configs" / ("smoke.yaml" if args.smoke else "frontier.yaml"))
    cfg = load_config(config, (SMOKE if args.smoke else []) + args.overrides)
    budgets, seeds = (SMOKE_BUDGETS, SMOKE_SEEDS) if args.smoke else (BUDGETS, SEEDS)
    budgets, seeds = parse_budgets(args.budgets, budgets), parse_seeds(args.seeds, seeds)
    out_base = Path(args.out or RESULTS / ("frontier-smoke" if args.smoke else "frontier"))
    if args.so_far:
        out_base = out_base.with_name(out_base.name + "-so-far")
    out = recorded(cfg, budgets, seeds) if args.so_far else run(cfg, args.reuse, budgets, seeds)
    blocks, made, lat = out["blocks"], out["made"], out["latency"]
    teacher = blocks["teacher"]
    rows = family_rows(made, blocks, teacher)
    checks = verdict(rows, teacher)
    trials = [TrialResult(trial=n, params=o, student_uri=n, success=blocks[n].success,
                          compute_ratio=blocks[n].executed_fraction, action_mse_norm=blocks[n].action_mse_norm,
                          family=o["distill.family"], ci95=blocks[n].ci95) for n, o in made.items()]
    out_base.parent.mkdir(parents=True, exist_ok=True)
    frontier_plot(trials, pareto(trials), TeacherPoint(success=teacher.success, ci95=teacher.ci95),
                  out_base.with_suffix(".png"))
    seconds = out["seconds"]
    if args.so_far:
        latency_note = ("Latency: not measured (--so-far: the recorded evaluations only). Not yet run: "
                        f"{', '.join(out['missing']) or 'none'}.")
    else:
        latency_note = (f"Latency: median of {cfg.evaluate.latency_calls} calls per policy and batch, interleaved, "
                        f"{cfg.evaluate.latency_threads} thread(s).")
    lines = [f"# The frontier study: `{cfg.run.name}` ({len(cfg.collect.tasks)} tasks x "
             f"{cfg.evaluate.episodes_per_task} episodes per policy, seeds {cfg.evaluate.seed}-"
             f"{cfg.evaluate.seed + cfg.evaluate.episodes_per_task - 1})", "",
             table(rows, teacher, lat), "",
             "| target | value | met |", "|---|---|---|",
             *[f"| {k} | {v['value']:.3f} | {'yes' if v['ok'] else 'NO'} |" for k, v in checks.items()], "",
             f"Tasks: {', '.join(cfg.collect.tasks)}. {latency_note}", "",
             "Wall seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
             + f"; {sum(seconds.values()) / 60:.1f} min in all"
             + (f" (reused from earlier sittings: {len(out['reused'])} stages)" if out["reused"] else ""), "",
             f"Machine: {machine()}"]
    text = "\n".join(lines)
    print("\n" + text)
    out_base.with_suffix(".md").write_text(text + "\n")
    out_base.with_suffix(".json").write_text(json.dumps(
        {"config": config, "overrides": args.overrides, "rows": rows, "checks": checks, "latency": lat,
         "students": made, "seconds": seconds, "machine": machine(),
         "policies": {n: b.model_dump(mode="json") for n, b in blocks.items()}}, indent=2, default=str))
    print(f"wrote {out_base}.md, .json and .png")
    return 0 if args.so_far or all(v["ok"] for v in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
