"""Evaluate policies side by side: closed-loop success, held-out action error, FLOPs, latency."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray.data
import torch

from pipeline.config import PipelineConfig
from pipeline.data.batches import fixed_column
from pipeline.data.manifest import read_manifest
from pipeline.data.shards import open_shards, split_episodes
from pipeline.data.validate import validate_shards
from pipeline.evaluate.flops import policy_flops
from pipeline.evaluate.metrics import action_error, wilson_interval
from pipeline.evaluate.policy import Policy
from pipeline.evaluate.report import EvaluationReport, PolicyReport, Ratios, TaskSuccess
from pipeline.evaluate.rollout import mean_layer_frequency, run_closed_loop, success_table
from pipeline.stages import RunPaths

LATENCY_SAMPLES = 32   # distinct held-out observations the batch-1 latency calls cycle through


def paired_latency(policies: dict[str, Policy], samples: list[dict[str, Any]], calls: int, threads: int = 1
                   ) -> dict[str, dict[str, float]]:
    """Batch-1 latency, calls interleaved across policies so machine noise hits all of them alike.

    Call i feeds samples[i % len(samples)] to every policy: a routed student's cost depends on its input,
    so its latency is taken over many real observations, not the layers one frame happens to open."""
    def args(i: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        s = samples[i % len(samples)]
        return s["image"][None], [s["instruction"]], s["proprio"][None]

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for policy in policies.values():
            for i in range(3):
                policy.act(*args(i))
        times: dict[str, list[float]] = {name: [] for name in policies}
        for i in range(calls):
            for name, policy in policies.items():
                call = args(i)
                start = time.perf_counter()
                policy.act(*call)
                times[name].append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(before)
    return {name: {"latency_ms_median": float(np.median(t)), "latency_ms_p90": float(np.percentile(t, 90))}
            for name, t in times.items()}


def _sample_rows(heldout: ray.data.Dataset, image_shape: tuple[int, int, int], proprio_dim: int, count: int,
                 seed: int) -> list[dict[str, Any]]:
    """Up to `count` real held-out observations (raw units), drawn across episodes, for the latency measurement."""
    fraction = min(1.0, 1.5 * count / max(1, heldout.count()))
    try:
        batch = heldout.random_sample(fraction, seed=seed).take_batch(count, batch_format="numpy")
    except ValueError:   # the sample came out empty (a tiny held-out split): one row still measures
        batch = heldout.take_batch(1, batch_format="numpy")
    h, w, c = image_shape
    images = fixed_column(batch, "image", h * w * c).reshape(-1, *image_shape).astype(np.uint8)
    proprio = fixed_column(batch, "proprio", proprio_dim).astype(np.float32)
    return [{"image": images[i], "instruction": str(batch["instruction"][i]), "proprio": proprio[i]}
            for i in range(len(images))]


def _policy_block(name: str, policy: Policy, results: list, offline: dict[str, float],
                  lat: dict[str, float]) -> PolicyReport:
    table = success_table(results, name)
    per_task = {}
    for task, outcomes in table.items():
        per_task[task] = TaskSuccess(success=float(np.mean(outcomes)), episodes=len(outcomes),
                                     ci95=wilson_interval(sum(outcomes), len(outcomes)))
    outcomes = [s for v in table.values() for s in v]
    lo, hi = wilson_interval(sum(outcomes), len(outcomes))
    freq = mean_layer_frequency(results, name)
    executed = float(np.mean(freq)) if freq else 1.0
    flops = policy_flops(policy.model.cfg, executed * policy.num_layers,
                         policy.model.cfg.router_hidden)   # None for a teacher or static layers: no router FLOPs
    return PolicyReport(success=float(np.mean(outcomes)), episodes=len(outcomes), ci95=(lo, hi),
                        per_task=per_task, executed_fraction=executed, layer_frequency=freq, flops=flops,
                        **offline, **lat)


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
    # Read once: the held-out rows serve the action error (an error if there are none) and the latency sample.
    heldout = open_shards(paths.shards, manifest, episodes=val_ids, skip_rows=report.skip_rows).materialize()
    offline = {name: action_error(p, heldout, image_shape) for name, p in policies.items()}
    samples = _sample_rows(heldout, image_shape, manifest.proprio_dim, LATENCY_SAMPLES, cfg.evaluate.seed)
    lat = paired_latency(policies, samples, cfg.evaluate.latency_calls, cfg.evaluate.latency_threads)
    blocks = {name: _policy_block(name, p, results, offline[name], lat[name]) for name, p in policies.items()}
    return EvaluationReport(tasks=cfg.collect.tasks, seeds=seeds, max_steps=cfg.evaluate.max_steps, policies=blocks,
                            ratios=_ratios(blocks) if "teacher" in blocks else None)


def _ratios(blocks: dict[str, PolicyReport]) -> dict[str, Ratios]:
    teacher = blocks["teacher"]
    return {name: Ratios(backbone_flops_ratio=b.flops["backbone"] / teacher.flops["backbone"],
                         total_flops_ratio=b.flops["total"] / teacher.flops["total"],
                         latency_speedup=teacher.latency_ms_median / b.latency_ms_median,
                         success_delta=b.success - teacher.success)
            for name, b in blocks.items() if name != "teacher"}
