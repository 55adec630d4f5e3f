"""Evaluation figures describe the same calls: compute is a mean over closed-loop calls, latency re-runs them."""

import numpy as np
import pytest
import torch

from pipeline.evaluate.policy import Policy
from pipeline.evaluate.report import EvaluationReport, summary_table, write_report
from pipeline.evaluate.rollout import (
    SAMPLES_PER_EPISODE,
    EpisodeResult,
    EpisodeSpec,
    RecordedCall,
    _Running,
    layer_frequency_over_calls,
)
from pipeline.evaluate.suite import _policy_block, measured_on, paired_latency, spread
from pipeline.models.checkpoint import PolicyCard, save_policy
from pipeline.models.student import derive_student
from pipeline.models.vla import VLA, VLAConfig

NORMALIZER = {"action_mean": [0.0] * 4, "action_std": [1.0] * 4, "proprio_mean": [0.0] * 4,
              "proprio_std": [1.0] * 4}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A 4-layer routed student whose router opens different layers for different frames."""
    torch.manual_seed(0)
    teacher = VLA(VLAConfig(backbone="llama", hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                            intermediate_size=64, vocab_size=64, max_instruction_tokens=6, image_size=32,
                            patch_size=8, proprio_dim=4, action_dim=4))
    model = derive_student(teacher, 8)
    torch.nn.init.normal_(model.router.out.weight, std=3.0)
    uri = str(tmp_path_factory.mktemp("figures") / "student")
    save_policy(model, uri, PolicyCard(normalizer=NORMALIZER, threshold=0.5))
    return Policy(uri)


def episode(steps, layers_each_call, layers=4, recorded=()):
    """An episode whose every call ran the first `layers_each_call` layers."""
    counts = [steps if i < layers_each_call else 0 for i in range(layers)]
    return EpisodeResult("student", "reach-v3", steps, True, steps, counts, [layers_each_call] * steps,
                         list(recorded))


def test_compute_is_a_mean_over_calls_not_over_episodes(student):
    # A 10-call episode running all 4 layers and a 90-call one running none: 10% of the calls ran each layer.
    # A mean of per-episode means (what the report gave before) would say 50%.
    results = [episode(10, 4), episode(90, 0)]
    assert layer_frequency_over_calls(results, "student") == pytest.approx([0.1] * 4)
    lat = {"latency_ms_median": 1.0, "latency_ms_p90": 1.0}
    offline = {"action_mse_norm": 0.1, "action_mse_raw": 0.1, "heldout_rows": 5.0}
    block = _policy_block("student", student, results, offline, lat)
    assert block.executed_fraction == pytest.approx(0.1)
    assert block.executed_fraction_p90 == pytest.approx(0.0) and block.closed_loop_calls == 100
    # FLOPs follow the same calls: the backbone's share is the executed fraction of a full pass.
    full = _policy_block("student", student, [episode(5, 4)], offline, lat)
    assert block.flops["backbone"] == pytest.approx(0.1 * full.flops["backbone"])


def test_an_episode_keeps_a_uniform_seeded_sample_of_its_calls():
    class Env:
        instruction = "reach"

    class Obs:
        def __init__(self, t):
            self.image = np.full((2, 2, 3), t % 256, np.uint8)
            self.proprio = np.array([t, 0, 0, 0], np.float32)

    def run(seed, steps):
        r = _Running(EpisodeSpec("student", "reach-v3", seed), Env(), Obs(0))
        for t in range(steps):
            r.obs = Obs(t)
            r.record(np.ones(4))
            r.steps += 1
        return [int(c.proprio[0]) for c in r.recorded]

    assert run(0, 3) == [0, 1, 2]                           # a short episode keeps every call
    kept = run(0, 150)
    assert len(kept) == SAMPLES_PER_EPISODE and kept == run(0, 150)   # reproducible
    hits = np.zeros(150)
    for seed in range(400):
        hits[run(seed, 150)] += 1
    # Uniform over the episode: late calls are kept as often as early ones (400 x 4 / 150 ~ 10.7 each).
    assert abs(hits[:75].sum() - hits[75:].sum()) < 0.15 * hits.sum()


def test_latency_is_timed_on_the_recorded_calls_and_reports_the_layers_they_ran(student):
    rng = np.random.default_rng(0)
    calls = []
    for i in range(12):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        proprio = rng.normal(0, 1, 4).astype(np.float32)
        ran = int(student.step(image[None], ["reach the goal"], proprio[None]).executed.sum())
        calls.append(RecordedCall(image, "reach the goal", proprio, ran))
    assert len({c.layers_run for c in calls}) > 1, "the test needs inputs that open different layers"
    chosen = spread(calls, 6)
    assert len(chosen) == 6 and chosen[0] is calls[0] and chosen[-1] is calls[-1]
    lat = paired_latency({"student": student}, {"student": chosen}, calls=12)["student"]
    assert lat["latency_inputs"] == 6
    # 12 calls cycle twice through the 6 inputs: the layers they ran are those recorded in closed loop.
    assert lat["latency_executed_fraction"] == pytest.approx(np.mean([c.layers_run for c in chosen]) / 4)
    assert 0 < lat["latency_ms_median"] <= lat["latency_ms_p90"]


def test_the_report_says_which_inputs_each_figure_comes_from(student):
    lat = {"latency_ms_median": 1.0, "latency_ms_p90": 2.0, "latency_inputs": 8, "latency_executed_fraction": 0.5}
    offline = {"action_mse_norm": 0.1, "action_mse_raw": 0.1, "heldout_rows": 5.0}
    block = _policy_block("student", student, [episode(10, 2)], offline, lat)
    report = EvaluationReport(tasks=["reach-v3"], seeds=[10_000, 10_001], max_steps=150,
                              policies={"student": block},
                              measured_on=measured_on(["reach-v3"], [10_000, 10_001], 150, 30))
    again = EvaluationReport.model_validate_json(report.to_json())
    assert again.policies["student"].latency_executed_fraction == 0.5
    assert "own closed-loop calls" in again.measured_on["latency_ms_median, latency_ms_p90"]
    text = summary_table(again)
    assert "Measured on:" in text and "0.50 / 0.50; 0.50" in text
    # A report written before these figures existed still reads.
    old = again.model_dump(exclude={"measured_on"})
    for key in ("executed_fraction_p90", "closed_loop_calls", "latency_inputs", "latency_executed_fraction"):
        old["policies"]["student"].pop(key)
    assert EvaluationReport.model_validate(old).policies["student"].latency_executed_fraction is None


def test_the_report_shows_which_layers_a_router_ran_on_each_task(student, tmp_path):
    # Reach ran layers 0 and 1 on every call, push layers 2 and 3 on 3 calls of 4 and 0 and 1 on the fourth.
    reach = episode(8, 2)
    push = EpisodeResult("student", "push-v3", 2, True, 4, [1, 1, 3, 3], [2] * 4, [])
    offline = {"action_mse_norm": 0.1, "action_mse_raw": 0.1, "heldout_rows": 5.0}
    lat = {"latency_ms_median": 1.0, "latency_ms_p90": 2.0}
    block = _policy_block("student", student, [reach, push], offline, lat)
    assert block.per_task["reach-v3"].layer_frequency == pytest.approx([1.0, 1.0, 0.0, 0.0])
    assert block.per_task["push-v3"].layer_frequency == pytest.approx([0.25, 0.25, 0.75, 0.75])
    report = EvaluationReport(tasks=["reach-v3", "push-v3"], seeds=[10_000], max_steps=150,
                              policies={"student": block}, measured_on={})
    text = write_report(report, tmp_path)["markdown"].read_text()
    assert "## Layers run per task" in text
    assert "| reach-v3 | 1.00 | 1.00 | 0.00 | 0.00 |" in text and "| push-v3 | 0.25 | 0.25 | 0.75 | 0.75 |" in text
    # A policy that runs the same layers on every call (a teacher, a static student) has no such table, and a
    # report written before per-task layer use existed still reads.
    fixed = _policy_block("student", student, [episode(5, 4)], offline, lat)
    plain = EvaluationReport(tasks=["reach-v3"], seeds=[10_000], max_steps=150, policies={"teacher": fixed},
                             measured_on={})
    assert "Layers run per task" not in write_report(plain, tmp_path / "plain")["markdown"].read_text()
    old = report.model_dump()
    for scores in old["policies"]["student"]["per_task"].values():
        scores.pop("layer_frequency")
    assert EvaluationReport.model_validate(old).policies["student"].per_task["push-v3"].layer_frequency is None
