"""bench/headline.py: the static ablation matches the student's compute; the verdict follows the targets."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.headline import ablations, checks, replicate_seeds, static_layers, table  # noqa: E402
from pipeline.evaluate.report import EvaluationReport  # noqa: E402


def test_static_ablation_runs_the_students_share_of_layers_evenly_spaced_ending_at_the_last():
    assert static_layers(0.45, 8) == [1, 3, 5, 7]
    assert static_layers(0.38, 8) == [2, 4, 7]
    assert static_layers(0.01, 8) == [7] and static_layers(1.0, 8) == list(range(8))
    assert ablations(0.5, 8)["static"] == {"distill.family": "static", "router.static_layers": [1, 3, 5, 7]}


def _block(success, executed, backbone):
    return {"success": success, "ci95": [0.0, 1.0], "episodes": 120, "executed_fraction": executed,
            "action_mse_norm": 0.05, "flops": {"backbone": backbone, "total": backbone + 5.0}, "per_task": {},
            "layer_frequency": [executed] * 8, "action_mse_raw": 0.01, "heldout_rows": 100.0,
            "latency_ms_median": 3.0 * executed, "latency_ms_p90": 4.0 * executed}


def _report(policies, ratios):
    return EvaluationReport.model_validate({"tasks": ["reach-v3"], "seeds": list(range(120)), "max_steps": 150,
                                            "policies": policies, "ratios": ratios})


def test_verdict_and_table_follow_the_headline_targets():
    policies = {"teacher": _block(0.70, 1.0, 80.0), "student": _block(0.675, 0.48, 38.4)}
    ratios = {"student": {"success_delta": -0.025, "backbone_flops_ratio": 0.48, "total_flops_ratio": 0.51,
                          "latency_speedup": 1.7}}
    assert all(v["ok"] for v in checks(_report(policies, ratios)).values())
    ratios["student"].update(success_delta=-0.04, latency_speedup=1.5)
    report = _report(policies, ratios)
    failed = [k for k, v in checks(report).items() if not v["ok"]]
    assert failed == ["student success >= teacher - 3 pts", "student batch-1 latency >= 1.6x lower"]
    text = table(report)
    row = "| ActDistill student (seed 0) | 0.675 (0.00-1.00, n=120) | -4.0 pts | x0.48 | x0.51 | x1.50 | 0.48 |"
    assert row in text


def test_a_target_is_met_only_if_every_replicate_student_meets_it():
    assert replicate_seeds(5, 3) == [6, 7] and replicate_seeds(0, 1) == []
    good = {"success_delta": -0.01, "backbone_flops_ratio": 0.42, "total_flops_ratio": 0.45, "latency_speedup": 1.7}
    bad = {**good, "backbone_flops_ratio": 0.63, "latency_speedup": 1.46}     # a replicate that kept more layers
    report = _report({"teacher": _block(0.70, 1.0, 80.0), "student": _block(0.69, 0.42, 33.6),
                      "student-seed1": _block(0.71, 0.63, 50.4)}, {"student": good, "student-seed1": bad})
    assert all(v["ok"] for v in checks(report).values())          # the first student alone passes
    verdict = checks(report, ["student", "student-seed1"])
    flops = verdict["student backbone FLOPs <= 50% of teacher"]
    assert not flops["ok"] and flops["value"] == 0.63 and flops["values"] == [0.42, 0.63]
    assert verdict["student batch-1 latency >= 1.6x lower"]["value"] == 1.46
    assert verdict["student success >= teacher - 3 pts"]["ok"]
    assert "| ActDistill student (seed 1) | 0.710" in table(report)


def test_reuse_keeps_a_stage_only_if_its_config_inputs_are_unchanged(tmp_path):
    from bench.headline import Stages
    from pipeline.config import PipelineConfig, with_overrides
    from pipeline.stages import inputs_digest

    cfg = with_overrides(PipelineConfig(), {"run.run_dir": str(tmp_path)})
    ran: list[str] = []

    def bench(digest, tag):
        """Two student stages in a row, as the bench runs the student and then a replicate."""
        stages = Stages(cfg, reuse=True)
        for name in ("distill", "replicate seed 1"):
            output = tmp_path / name / "model.safetensors"

            def fn(output=output, name=name):
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(tag)
                ran.append(f"{name} ({tag})")
            stages.run(name, output, fn, digest)

    digest = inputs_digest(cfg, "distill")
    bench(digest, "first")
    bench(digest, "same config")
    assert ran == ["distill (first)", "replicate seed 1 (first)"]          # same inputs: both reused
    # Evaluation settings are not an input of a student; its router config is.
    assert inputs_digest(with_overrides(cfg, {"evaluate.episodes_per_task": 9}), "distill") == digest
    changed = inputs_digest(with_overrides(cfg, {"router.budget": 0.3}), "distill")
    assert changed != digest
    bench(changed, "new router")
    assert ran[2:] == ["distill (new router)", "replicate seed 1 (new router)"]
    assert (tmp_path / "distill" / "model.safetensors").read_text() == "new router"


def test_reuse_reruns_only_the_stages_that_need_one_that_ran(tmp_path):
    """The frontier's students are independent: distilling a new one must not roll out the recorded ones again,
    but its own evaluation (which needs it) runs, and a new teacher makes every student stale."""
    from bench.headline import Stages
    from pipeline.config import PipelineConfig, with_overrides

    cfg = with_overrides(PipelineConfig(), {"run.run_dir": str(tmp_path)})
    ran: list[str] = []

    def sitting(plan, fresh=()):
        stages = Stages(cfg, reuse=True)
        for name, needs in plan:
            output = tmp_path / name
            if name in fresh:
                output.unlink(missing_ok=True)
            stages.run(name, output, lambda o=output, n=name: (o.write_text(n), ran.append(n)), "d", needs)
        return stages

    teacher = ("teacher", None)
    plan = [teacher, ("distill a", ("teacher",)), ("evaluate a", ("distill a", "teacher")),
            ("distill b", ("teacher",)), ("evaluate b", ("distill b", "teacher"))]
    sitting(plan)
    assert ran == [name for name, _ in plan]
    ran.clear()
    stages = sitting(plan, fresh={"distill a"})   # a's weights deleted: a again; b and the teacher reused
    assert ran == ["distill a", "evaluate a"]
    assert stages.reused == ["teacher", "distill b", "evaluate b"]
    ran.clear()
    sitting(plan)
    assert ran == []
    sitting(plan, fresh={"teacher"})                # a new teacher: every student after it runs again
    assert ran == [name for name, _ in plan]
