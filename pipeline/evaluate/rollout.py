"""Closed-loop Meta-World episodes for several policies on the same seeds, one Ray task per task name."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodeResult:
    policy: str
    task: str
    seed: int
    success: bool
    steps: int
    executed_fraction: float
    layer_frequency: list[float]


def _episode(policy: "object", task: str, seed: int, image_size: int, camera: str, max_steps: int
             ) -> tuple[bool, int]:
    from pipeline.sim.metaworld_env import SimEnv

    env = SimEnv(task, seed, image_size, camera)
    try:
        obs = env.reset()
        for step in range(max_steps):
            action = policy.act(obs.image[None], [env.instruction], obs.proprio[None])[0]
            obs, success = env.step(action)
            if success:
                return True, step + 1
        return False, max_steps
    finally:
        env.close()


@ray.remote(num_cpus=1)
def _task_episodes(policies: dict[str, str], task: str, seeds: list[int], image_size: int, camera: str,
                   max_steps: int) -> list[EpisodeResult]:
    import torch

    from pipeline.evaluate.policy import Policy

    torch.set_num_threads(1)  # one env per core; intra-op threads would fight the other task
    loaded = {name: Policy(uri) for name, uri in policies.items()}
    results = []
    for seed in seeds:
        for name, policy in loaded.items():
            policy.executed.clear()
            success, steps = _episode(policy, task, seed, image_size, camera, max_steps)
            results.append(EpisodeResult(name, task, seed, success, steps, policy.executed_fraction(),
                                         policy.layer_frequency()))
    return results


def run_closed_loop(policies: dict[str, str], tasks: list[str], seeds: list[int], image_size: int,
                    camera: str, max_steps: int) -> list[EpisodeResult]:
    """Every policy runs every (task, seed): teacher and student face identical initial states."""
    # Inside a Tune trial, child tasks would be captured by the trial's 0.01-CPU placement group and
    # could never be scheduled; the rollouts reserve their own CPUs instead.
    task = _task_episodes.options(scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    pending = [task.remote(policies, t, seeds, image_size, camera, max_steps) for t in tasks]
    results: list[EpisodeResult] = []
    with tqdm(total=len(tasks) * len(seeds) * len(policies), desc="evaluate", unit="episode") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            chunk = ray.get(done[0])
            results.extend(chunk)
            bar.update(len(chunk))
    order = {t: i for i, t in enumerate(tasks)}
    return sorted(results, key=lambda r: (order[r.task], r.seed, r.policy))


def success_table(results: list[EpisodeResult], policy: str) -> dict[str, list[bool]]:
    table: dict[str, list[bool]] = {}
    for r in results:
        if r.policy == policy:
            table.setdefault(r.task, []).append(r.success)
    return table


def mean_layer_frequency(results: list[EpisodeResult], policy: str) -> list[float]:
    rows = [r.layer_frequency for r in results if r.policy == policy]
    return np.mean(rows, axis=0).tolist() if rows else []
