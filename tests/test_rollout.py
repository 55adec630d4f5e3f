"""Closed-loop evaluation over Ray actors: every episode once, batched calls equal to one env at a time."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from pipeline.config import load_config
from pipeline.distill.calibrate import calibrate_student, executed_fraction, threshold_for
from pipeline.evaluate.policy import Policy
from pipeline.evaluate.rollout import SAMPLES_PER_EPISODE, layer_frequency_over_calls, run_closed_loop
from pipeline.models.checkpoint import PolicyCard, read_policy_config, save_policy
from pipeline.models.student import derive_student
from pipeline.models.vla import VLA, VLAConfig

pytestmark = pytest.mark.slow   # Ray and Meta-World

REPO = Path(__file__).resolve().parents[1]

NORMALIZER = {"action_mean": [0.0] * 4, "action_std": [0.5] * 4, "proprio_mean": [0.0] * 4,
              "proprio_std": [1.0] * 4}


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    torch.manual_seed(0)
    cfg = VLAConfig(backbone="llama", hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, vocab_size=64, max_instruction_tokens=6, image_size=32, patch_size=8,
                    proprio_dim=4, action_dim=4)
    teacher = VLA(cfg).eval()
    routed = derive_student(teacher, router_hidden=8)
    with torch.no_grad():   # gates that depend on the input: some layers open for some frames only
        routed.router.out.weight.normal_(0.0, 2.0)
        routed.router.out.bias.zero_()
    uris = {"teacher": teacher, "routed": routed, "static": derive_student(teacher, 8, static_layers=(0, 2))}
    for name, model in uris.items():
        save_policy(model, str(root / name), PolicyCard(normalizer=NORMALIZER))
    return {name: str(root / name) for name in uris}


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _key(r):
    return r.policy, r.task, r.seed


def test_actors_run_every_episode_once_and_batching_changes_nothing(policies, ray_local):
    tasks, seeds = ["drawer-close-v3", "button-press-v3"], [10_000, 10_001, 10_002]
    batched = run_closed_loop(policies, tasks, seeds, 32, "corner", 12, num_workers=2, envs_per_worker=3)
    assert sorted(map(_key, batched)) == sorted((p, t, s) for p in policies for t in tasks for s in seeds)
    single = {_key(r): r for r in run_closed_loop(policies, tasks, seeds[:2], 32, "corner", 12,
                                                  num_workers=1, envs_per_worker=1)}
    for r in batched:
        if _key(r) in single:   # rows of a batch are independent: the same episode, step for step
            s = single[_key(r)]
            assert (r.success, r.steps) == (s.success, s.steps)
            np.testing.assert_allclose(r.layer_frequency, s.layer_frequency, atol=1e-6)
    assert all(r.executed_fraction == 1.0 for r in batched if r.policy == "teacher")
    assert layer_frequency_over_calls(batched, "static") == [1.0, 0.0, 1.0, 0.0]
    routed = layer_frequency_over_calls(batched, "routed")
    assert 0.0 < float(np.mean(routed)) < 1.0 and any(0.0 < f < 1.0 for f in routed)
    # Each episode keeps some of its own calls for the latency measurement: re-run, a recorded observation
    # opens exactly the layers it opened in closed loop, so it is the input the policy was given.
    student = Policy(policies["routed"])
    for r in batched:
        assert len(r.recorded) == min(r.steps, SAMPLES_PER_EPISODE) and len(r.layers_per_call) == r.steps
        if r.policy == "routed":
            for call in r.recorded:
                again = student.step(call.image[None], [call.instruction], call.proprio[None])
                assert int(again.executed.sum()) == call.layers_run


def test_the_gate_quantile_opens_the_budgets_share_of_layers_even_with_saturated_gates():
    gates = np.random.default_rng(0).uniform(size=(500, 8))
    for budget in (0.25, 0.375, 0.5):
        assert executed_fraction(gates, threshold_for(gates, budget)) == pytest.approx(budget, abs=1e-3)
    saturated = np.repeat([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]], 10, axis=0)   # annealed gates at 0/1
    assert executed_fraction(saturated, threshold_for(saturated, 0.375)) == 0.375


def test_calibration_sets_the_threshold_at_which_the_student_runs_its_budget_in_closed_loop(policies, ray_local,
                                                                                          tmp_path):
    uri = tmp_path / "routed"
    shutil.copytree(policies["routed"], uri)
    cfg = load_config(REPO / "jobs/configs/smoke.yaml", [
        "collect.tasks=[drawer-close-v3,button-press-v3]", "collect.image_size=32", "router.budget=0.3",
        "router.calibrate_episodes=3", "evaluate.max_steps=12", "evaluate.num_workers=2", "evaluate.envs_per_worker=3",
        "run.device=cpu"])
    before = read_policy_config(str(uri))
    result = calibrate_student(cfg, str(uri))
    # The trained threshold (0.5) ran another share of this random router's layers; the calibrated one runs the
    # budget, measured on the closed-loop calls it made itself (6 episodes on seeds apart from evaluation's).
    assert abs(result.fraction_trained_threshold - 0.3) > 0.05
    assert abs(result.fraction - 0.3) <= 0.03 and result.calls > 6
    assert result.seeds[0] == cfg.evaluate.seed + 50_000 and result.episodes == 6
    after = read_policy_config(str(uri))
    assert after.threshold == result.threshold != before.threshold and after.hash == before.hash   # same weights
    assert after.model_extra["calibration"]["fraction"] == result.fraction
    assert Policy(str(uri)).threshold == result.threshold        # what evaluate and serving run
