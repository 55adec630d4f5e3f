"""Closed-loop Meta-World episodes for several policies on the same seeds, run by a pool of Ray actors.

Each actor loads every policy once and steps `envs_per_worker` environments in lockstep: one batched
policy call per step serves all of them (the per-call overhead of the model is paid once per batch, not
once per environment). Finished episodes stream back one by one, so the driver's progress bar counts
episodes, not chunks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

@dataclass(frozen=True)
class EpisodeSpec:
    policy: str
    task: str
    seed: int


@dataclass(frozen=True)
class EpisodeResult:
    policy: str
    task: str
    seed: int
    success: bool
    steps: int
    executed_fraction: float
    layer_frequency: list[float]


@dataclass
class _Running:
    """One environment in flight: its episode, the last observation, and the layers run so far."""

    spec: EpisodeSpec
    env: Any
    obs: Any
    steps: int = 0
    executed: list[np.ndarray] = field(default_factory=list)

    def result(self, success: bool) -> EpisodeResult:
        flags = np.stack(self.executed)   # steps x L; an episode ends after at least one step
        return EpisodeResult(self.spec.policy, self.spec.task, self.spec.seed, success, self.steps,
                             float(flags.mean()), flags.mean(0).tolist())


@ray.remote(num_cpus=1)
class RolloutWorker:
    """Holds the policies and runs batches of episodes; lives on one CPU (intra-op threads would fight
    the other workers and the renderer)."""

    def __init__(self, policies: dict[str, str], image_size: int, camera: str, max_steps: int,
                 envs_per_worker: int) -> None:
        import torch

        from pipeline.evaluate.policy import Policy

        torch.set_num_threads(1)
        self.policies = {name: Policy(uri) for name, uri in policies.items()}
        self.image_size, self.camera, self.max_steps = image_size, camera, max_steps
        self.envs_per_worker = envs_per_worker

    def run(self, specs: list[EpisodeSpec]) -> Iterator[EpisodeResult]:
        """A generator task: yields each episode's result as soon as it ends."""
        for name, policy in self.policies.items():
            yield from self._run_policy(policy, deque(s for s in specs if s.policy == name))

    def _start(self, spec: EpisodeSpec) -> _Running:
        from pipeline.sim.metaworld_env import SimEnv

        env = SimEnv(spec.task, spec.seed, self.image_size, self.camera)
        return _Running(spec, env, env.reset())

    def _run_policy(self, policy: Any, queue: deque[EpisodeSpec]) -> Iterator[EpisodeResult]:
        running: list[_Running] = []
        try:
            while queue or running:
                while queue and len(running) < self.envs_per_worker:
                    running.append(self._start(queue.popleft()))
                step = policy.step(np.stack([r.obs.image for r in running]),
                                   [r.env.instruction for r in running],
                                   np.stack([r.obs.proprio for r in running]))
                still = []
                for r, action, flags in zip(running, step.actions, step.executed):
                    r.obs, success = r.env.step(action)
                    r.steps += 1
                    r.executed.append(flags)
                    if success or r.steps >= self.max_steps:
                        r.env.close()
                        yield r.result(success)
                    else:
                        still.append(r)
                running = still
        finally:
            for r in running:
                r.env.close()


def _split(specs: list[EpisodeSpec], workers: int) -> list[list[EpisodeSpec]]:
    """Round-robin, so every worker gets a mix of tasks and policies (episode lengths differ by task)."""
    return [chunk for chunk in (specs[i::workers] for i in range(workers)) if chunk]


def run_closed_loop(policies: dict[str, str], tasks: list[str], seeds: list[int], image_size: int,
                    camera: str, max_steps: int, num_workers: int = 2, envs_per_worker: int = 8
                    ) -> list[EpisodeResult]:
    """Every policy runs every (task, seed): teacher and student face identical initial states."""
    # Policy-major, so the round-robin split gives every worker its share of each policy's episodes.
    specs = [EpisodeSpec(name, task, seed) for name in policies for task in tasks for seed in seeds]
    # Inside a Tune trial, child actors would be captured by the trial's 0.01-CPU placement group and
    # could never be scheduled; the rollout workers reserve their own CPUs instead.
    worker = RolloutWorker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    chunks = _split(specs, num_workers)
    actors = [worker.remote(policies, image_size, camera, max_steps, envs_per_worker) for _ in chunks]
    streams = [actor.run.remote(chunk) for actor, chunk in zip(actors, chunks)]
    results: list[EpisodeResult] = []
    try:
        with tqdm(total=len(specs), desc="evaluate", unit="episode") as bar:
            while streams:
                ready, streams = ray.wait(streams, num_returns=1)
                try:
                    results.append(ray.get(next(ready[0])))
                except StopIteration:
                    continue          # this worker is done
                streams.append(ready[0])
                bar.update(1)
    finally:
        for actor in actors:
            ray.kill(actor)
    if len(results) != len(specs):
        raise RuntimeError(f"closed-loop evaluation returned {len(results)} of {len(specs)} episodes")
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
