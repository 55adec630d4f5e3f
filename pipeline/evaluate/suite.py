"""Evaluate policies side by side: closed-loop success, held-out action error, FLOPs, latency."""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.config import PipelineConfig
from pipeline.data.manifest import read_manifest
from pipeline.data.shards import open_shards, split_episodes
from pipeline.data.validate import validate_shards
from pipeline.evaluate.flops import policy_flops
from pipeline.evaluate.metrics import action_error, wilson_interval
from pipeline.evaluate.policy import Policy
from pipeline.evaluate.report import EvaluationReport, PolicyReport, Ratios, TaskSuccess
from pipeline.evaluate.rollout import (
    SAMPLES_PER_EPISODE,
    EpisodeResult,
    RecordedCall,
    calls_of,
    layer_frequency_over_calls,
    recorded_calls,
    run_closed_loop,
    success_table,
)
from pipeline.stages import RunPaths


def spread(calls: list[RecordedCall], count: int) -> list[RecordedCall]:
    """Up to `count` of the recorded calls, evenly spaced over episodes (results come sorted by task, seed)."""
    if len(calls) <= count:
        return calls
    return [calls[int(i)] for i in np.linspace(0, len(calls) - 1, count).round()]


def paired_latency(policies: dict[str, Policy], inputs: dict[str, list[RecordedCall]], calls: int,
                   threads: int = 1) -> dict[str, dict[str, float]]:
    """Batch-1 latency of each policy on observations from its own closed-loop episodes, calls interleaved
    across policies so machine noise hits all of them alike.

    Call i feeds policy p its input i (cycling): a routed student's cost depends on its input, so it is timed
    on the inputs its closed-loop compute figures come from, and the layers those very calls ran are reported
    beside the time (latency_executed_fraction)."""
    def args(call: RecordedCall) -> tuple[np.ndarray, list[str], np.ndarray]:
        return call.image[None], [call.instruction], call.proprio[None]

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, policy in policies.items():
            for i in range(3):
                policy.act(*args(inputs[name][i % len(inputs[name])]))
        times: dict[str, list[float]] = {name: [] for name in policies}
        layers: dict[str, list[float]] = {name: [] for name in policies}
        for i in range(calls):
            for name, policy in policies.items():
                call = args(inputs[name][i % len(inputs[name])])
                start = time.perf_counter()
                step = policy.step(*call)
                times[name].append((time.perf_counter() - start) * 1000.0)
                layers[name].append(float(step.executed.mean()))
    finally:
        torch.set_num_threads(before)
    return {name: {"latency_ms_median": float(np.median(t)), "latency_ms_p90": float(np.percentile(t, 90)),
                   "latency_inputs": len(inputs[name]), "latency_executed_fraction": float(np.mean(layers[name]))}
            for name, t in times.items()}


def _policy_block(name: str, policy: Policy, results: list[EpisodeResult], offline: dict[str, float],
                  lat: dict[str, float]) -> PolicyReport:
    table = success_table(results, name)
    per_task = {}
    for task, outcomes in table.items():
        per_task[task] = TaskSuccess(success=float(np.mean(outcomes)), episodes=len(outcomes),
                                     ci95=wilson_interval(sum(outcomes), len(outcomes)))
    outcomes = [s for v in table.values() for s in v]
    lo, hi = wilson_interval(sum(outcomes), len(outcomes))
    per_call = np.asarray(calls_of(results, name), dtype=float) / policy.num_layers
    executed = float(per_call.mean())      # a mean over calls: FLOPs per call are linear in the layers run
    flops = policy_flops(policy.model.cfg, executed * policy.num_layers,
                         policy.model.cfg.router_hidden)   # None for a teacher or static layers: no router FLOPs
    return PolicyReport(success=float(np.mean(outcomes)), episodes=len(outcomes), ci95=(lo, hi),
                        per_task=per_task, executed_fraction=executed,
                        executed_fraction_p90=p90_per_call(per_call), closed_loop_calls=len(per_call),
                        layer_frequency=layer_frequency_over_calls(results, name), flops=flops, **offline, **lat)


def p90_per_call(fractions: np.ndarray) -> float:
    """The executed fraction 90% of calls stay at or under: a value some call actually had (no interpolation
    between a 3-layer and a 4-layer call)."""
    return float(np.quantile(fractions, 0.9, method="inverted_cdf"))


def measured_on(tasks: list[str], seeds: list[int], max_steps: int, latency_calls: int) -> dict[str, str]:
    """Which inputs each figure of a report comes from (the report says it, so a reader need not guess)."""
    return {
        "success": f"closed loop: {len(tasks)} task(s) x {len(seeds)} seed(s) ({seeds[0]}-{seeds[-1]}), "
                   f"at most {max_steps} steps per episode",
        "executed_fraction, executed_fraction_p90, layer_frequency, flops": (
            "every closed-loop call of the policy in those episodes (one per environment step): the mean over "
            "calls, and the 90th percentile of a call's executed fraction"),
        "latency_ms_median, latency_ms_p90": (
            f"{latency_calls} batch-1 calls re-running observations recorded from the policy's own closed-loop "
            f"calls ({SAMPLES_PER_EPISODE} per episode, drawn uniformly over its calls); "
            f"latency_executed_fraction is the layers those timed calls ran"),
        "action_mse_norm, action_mse_raw": "held-out expert rows (offline, heldout_rows of them)",
    }


def evaluate_policies(cfg: PipelineConfig, uris: dict[str, str], episodes_per_task: int) -> EvaluationReport:
    """One block per policy, plus each policy's ratios to the teacher when a teacher is among them."""
    paths = RunPaths.of(cfg)
    manifest = read_manifest(paths.shards)
    # Before minutes of rollouts: a bad shard stops here naming file, row and fix (or, with
    # data.on_bad_rows=skip, its rows leave the held-out set, counted); reused from earlier stages of the run.
    report = validate_shards(paths.shards, manifest, cfg.data.on_bad_rows, cache_dir=paths.validation)
    _, val_ids = split_episodes(manifest, cfg.data.val_fraction)
    image_shape = tuple(manifest.image_shape)
    seeds = [cfg.evaluate.seed + i for i in range(episodes_per_task)]
    results = run_closed_loop(uris, cfg.collect.tasks, seeds, manifest.image_shape[0], cfg.collect.camera,
                              cfg.evaluate.max_steps, cfg.evaluate.num_workers, cfg.evaluate.envs_per_worker)
    policies = {name: Policy(uri) for name, uri in uris.items()}
    # Read once: every policy's action error is measured on the held-out rows (an error if there are none).
    heldout = open_shards(paths.shards, manifest, episodes=val_ids, skip_rows=report.skip_rows).materialize()
    offline = {name: action_error(p, heldout, image_shape) for name, p in policies.items()}
    own = {name: spread(recorded_calls(results, name), cfg.evaluate.latency_calls) for name in policies}
    lat = paired_latency(policies, own, cfg.evaluate.latency_calls, cfg.evaluate.latency_threads)
    blocks = {name: _policy_block(name, p, results, offline[name], lat[name]) for name, p in policies.items()}
    return EvaluationReport(tasks=cfg.collect.tasks, seeds=seeds, max_steps=cfg.evaluate.max_steps, policies=blocks,
                            ratios=_ratios(blocks) if "teacher" in blocks else None,
                            measured_on=measured_on(cfg.collect.tasks, seeds, cfg.evaluate.max_steps,
                                                    cfg.evaluate.latency_calls))


def _ratios(blocks: dict[str, PolicyReport]) -> dict[str, Ratios]:
    teacher = blocks["teacher"]
    return {name: Ratios(backbone_flops_ratio=b.flops["backbone"] / teacher.flops["backbone"],
                         total_flops_ratio=b.flops["total"] / teacher.flops["total"],
                         latency_speedup=teacher.latency_ms_median / b.latency_ms_median,
                         success_delta=b.success - teacher.success)
            for name, b in blocks.items() if name != "teacher"}
