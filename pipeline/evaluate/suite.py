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
from pipeline.evaluate.policy import Policy, PolicyStep
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
from pipeline.train.device import resolve_device


def spread(calls: list[RecordedCall], count: int) -> list[RecordedCall]:
    """Up to `count` of the recorded calls, evenly spaced over episodes (results come sorted by task, seed)."""
    if len(calls) <= count:
        return calls
    return [calls[int(i)] for i in np.linspace(0, len(calls) - 1, count).round()]


def device_label(device: torch.device) -> str:
    """What a report says its figures were measured on: "cpu", or "cuda (NVIDIA H200)"."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def timed_step(policy: Policy, call: tuple[np.ndarray, list[str], np.ndarray]) -> tuple[PolicyStep, float]:
    """One policy call and its wall time in ms. On cuda the queue is drained before and after: without that
    the clock would time kernel launches (and the previous call's leftovers), not the call."""
    cuda = policy.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(policy.device)
    start = time.perf_counter()
    step = policy.step(*call)
    if cuda:
        torch.cuda.synchronize(policy.device)
    return step, (time.perf_counter() - start) * 1000.0


def paired_latency(policies: dict[str, Policy], inputs: dict[str, list[RecordedCall]], calls: int,
                   threads: int = 1, batch: int = 1) -> dict[str, dict[str, float]]:
    """Latency of each policy at `batch` rows per call (1: a controller's call) on observations from its own
    closed-loop episodes, calls interleaved across policies so machine noise hits all of them alike.

    Call i feeds policy p its inputs i*batch .. i*batch+batch-1 (cycling): a routed student's cost depends on its
    input, so it is timed on the inputs its closed-loop compute figures come from, and the layers those very calls
    ran are reported beside the time (latency_executed_fraction)."""
    def args(name: str, i: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        own = inputs[name]
        rows = [own[(i * batch + j) % len(own)] for j in range(batch)]
        return (np.stack([r.image for r in rows]), [r.instruction for r in rows],
                np.stack([r.proprio for r in rows]))

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, policy in policies.items():
            for i in range(3):
                policy.act(*args(name, i))
        times: dict[str, list[float]] = {name: [] for name in policies}
        layers: dict[str, list[float]] = {name: [] for name in policies}
        for i in range(calls):
            for name, policy in policies.items():
                step, ms = timed_step(policy, args(name, i))
                times[name].append(ms)
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
                                     ci95=wilson_interval(sum(outcomes), len(outcomes)),
                                     layer_frequency=layer_frequency_over_calls(
                                         [r for r in results if r.task == task], name))
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


def measured_on(tasks: list[str], seeds: list[int], max_steps: int, latency_calls: int,
                device: str = "cpu") -> dict[str, str]:
    """Which inputs each figure of a report comes from, and the device (device_label) the driver-side figures,
    latency and action error, were computed on (the report says it, so a reader need not guess)."""
    return {
        "success": f"closed loop: {len(tasks)} task(s) x {len(seeds)} seed(s) ({seeds[0]}-{seeds[-1]}), "
                   f"at most {max_steps} steps per episode",
        "executed_fraction, executed_fraction_p90, layer_frequency, flops": (
            "every closed-loop call of the policy in those episodes (one per environment step): the mean over "
            "calls, and the 90th percentile of a call's executed fraction"),
        "latency_ms_median, latency_ms_p90": (
            f"{latency_calls} batch-1 calls on {device} re-running observations recorded from the policy's own "
            f"closed-loop calls ({SAMPLES_PER_EPISODE} per episode, drawn uniformly over its calls); "
            f"latency_executed_fraction is the layers those timed calls ran"),
        "action_mse_norm, action_mse_raw": f"held-out expert rows (offline, heldout_rows of them), on {device}",
    }


def evaluate_policies(cfg: PipelineConfig, uris: dict[str, str], episodes_per_task: int) -> EvaluationReport:
    """One block per policy, plus each policy's ratios to the teacher when a teacher is among them.

    Device: run.device is resolved once (after start_ray; a cuda run on a cluster without GPUs fails here,
    before any rollout). The rollout workers run the policies on it. Action error and latency are measured in
    this (driver) process: on its GPU when the run is on cuda and the driver sees one, otherwise on its CPU
    (a driver without a GPU joined to a GPU cluster); measured_on names the device they ran on either way."""
    device = resolve_device(cfg)
    here = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
    paths = RunPaths.of(cfg)
    manifest = read_manifest(paths.shards)
    # Before minutes of rollouts: a bad shard stops here naming file, row and fix (or, with
    # data.on_bad_rows=skip, its rows leave the held-out set, counted); reused from earlier stages of the run.
    report = validate_shards(paths.shards, manifest, cfg.data.on_bad_rows, cache_dir=paths.validation)
    _, val_ids = split_episodes(manifest, cfg.data.val_fraction)
    image_shape = tuple(manifest.image_shape)
    seeds = [cfg.evaluate.seed + i for i in range(episodes_per_task)]
    results = run_closed_loop(uris, cfg.collect.tasks, seeds, manifest.image_shape[0], cfg.collect.camera,
                              cfg.evaluate.max_steps, cfg.evaluate.num_workers, cfg.evaluate.envs_per_worker, device)
    policies = {name: Policy(uri, str(here)) for name, uri in uris.items()}
    # Read once: every policy's action error is measured on the held-out rows (an error if there are none).
    heldout = open_shards(paths.shards, manifest, episodes=val_ids, skip_rows=report.skip_rows).materialize()
    offline = {name: action_error(p, heldout, image_shape) for name, p in policies.items()}
    own = {name: spread(recorded_calls(results, name), cfg.evaluate.latency_calls) for name in policies}
    lat = paired_latency(policies, own, cfg.evaluate.latency_calls, cfg.evaluate.latency_threads)
    blocks = {name: _policy_block(name, p, results, offline[name], lat[name]) for name, p in policies.items()}
    return EvaluationReport(tasks=cfg.collect.tasks, seeds=seeds, max_steps=cfg.evaluate.max_steps, policies=blocks,
                            ratios=_ratios(blocks) if "teacher" in blocks else None,
                            measured_on=measured_on(cfg.collect.tasks, seeds, cfg.evaluate.max_steps,
                                                    cfg.evaluate.latency_calls, device_label(here)))


def _ratios(blocks: dict[str, PolicyReport]) -> dict[str, Ratios]:
    teacher = blocks["teacher"]
    return {name: Ratios(backbone_flops_ratio=b.flops["backbone"] / teacher.flops["backbone"],
                         total_flops_ratio=b.flops["total"] / teacher.flops["total"],
                         latency_speedup=teacher.latency_ms_median / b.latency_ms_median,
                         success_delta=b.success - teacher.success)
            for name, b in blocks.items() if name != "teacher"}
