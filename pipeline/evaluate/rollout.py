"""Closed-loop Meta-World episodes for several policies on the same seeds, run by a pool of Ray actors.

Each actor loads every policy once and steps `envs_per_worker` environments in lockstep: one batched
policy call per step serves all of them (the per-call overhead of the model is paid once per batch, not
once per environment). Finished episodes stream back one by one, so the driver's progress bar counts
episodes, not chunks.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

# Observations each episode keeps for the latency measurement: drawn uniformly over its calls (reservoir
# sampling, seeded by the episode), so the timed inputs are the policy's own closed-loop inputs. 4 x 12 KiB
# per 64 px episode: 120 demo episodes hand ~6 MiB per policy back to the driver.
SAMPLES_PER_EPISODE = 4


@dataclass(frozen=True)
class EpisodeSpec:
    policy: str
    task: str
    seed: int


@dataclass(frozen=True)
class RecordedCall:
    """One closed-loop policy call, as the policy saw it, and the decoder layers it ran."""

    image: np.ndarray        # H x W x 3 uint8
    instruction: str
    proprio: np.ndarray      # P, raw units
    layers_run: int


@dataclass(frozen=True)
class EpisodeResult:
    policy: str
    task: str
    seed: int
    success: bool
    steps: int                        # policy calls, one per environment step
    layer_counts: list[int]           # per decoder layer, the calls of this episode that ran it
    layers_per_call: list[int]        # per call, the decoder layers it ran
    recorded: list[RecordedCall]      # up to SAMPLES_PER_EPISODE of its calls, for the latency measurement
    gates: np.ndarray | None = None   # steps x L router gate values of a routed student (its calibration reads them)

    @property
    def executed_fraction(self) -> float:
        return sum(self.layers_per_call) / (self.steps * len(self.layer_counts))

    @property
    def layer_frequency(self) -> list[float]:
        return [c / self.steps for c in self.layer_counts]


@dataclass
class _Running:
    """One environment in flight: its episode, the last observation, and the layers run so far."""

    spec: EpisodeSpec
    env: Any
    obs: Any
    steps: int = 0
    executed: list[np.ndarray] = field(default_factory=list)
    gates: list[np.ndarray] = field(default_factory=list)
    recorded: list[RecordedCall] = field(default_factory=list)
    rng: np.random.Generator | None = None

    def record(self, flags: np.ndarray) -> None:
        """Keep this call with probability SAMPLES_PER_EPISODE / calls so far (reservoir sampling)."""
        if self.rng is None:
            self.rng = np.random.default_rng([self.spec.seed, zlib.crc32(self.spec.task.encode())])
        slot = self.steps if self.steps < SAMPLES_PER_EPISODE else int(self.rng.integers(0, self.steps + 1))
        if slot >= SAMPLES_PER_EPISODE:
            return
        call = RecordedCall(self.obs.image.copy(), self.env.instruction, self.obs.proprio.copy(),
                            int(flags.sum()))
        if slot == len(self.recorded):
            self.recorded.append(call)
        else:
            self.recorded[slot] = call

    def result(self, success: bool) -> EpisodeResult:
        flags = np.stack(self.executed) > 0.5   # steps x L; an episode ends after at least one step
        gates = np.stack(self.gates).astype(np.float32) if self.gates else None   # 4 bytes x L per call
        return EpisodeResult(self.spec.policy, self.spec.task, self.spec.seed, success, self.steps,
                             flags.sum(0).tolist(), flags.sum(1).tolist(), self.recorded, gates)


@ray.remote(num_cpus=1)
class RolloutWorker:
    """Holds the policies and runs batches of episodes; lives on one CPU (intra-op threads would fight
    the other workers and the renderer), and on cuda runs the policies on its share of a GPU."""

    def __init__(self, policies: dict[str, str], image_size: int, camera: str, max_steps: int,
                 envs_per_worker: int, device: str = "cpu") -> None:
        import torch

        from pipeline.evaluate.policy import Policy

        torch.set_num_threads(1)
        # cuda: the GPU Ray gave this actor a share of (visible as cuda:0).
        self.policies = {name: Policy(uri, device) for name, uri in policies.items()}
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
                gates = step.gates if step.gates is not None else [None] * len(running)
                for r, action, flags, gate in zip(running, step.actions, step.executed, gates):
                    r.record(flags)
                    r.obs, success = r.env.step(action)
                    r.steps += 1
                    r.executed.append(flags)
                    if gate is not None:
                        r.gates.append(gate)
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


def gpu_share(workers: int) -> float:
    """Each rollout worker's share of one GPU, rounded down to Ray's 0.0001 resource unit so that `workers`
    shares never add up to more than one GPU (1/7 rounded to nearest would be 0.1429: 7 x 0.1429 > 1)."""
    return math.floor(10_000 / workers) / 10_000


def run_closed_loop(policies: dict[str, str], tasks: list[str], seeds: list[int], image_size: int,
                    camera: str, max_steps: int, num_workers: int = 2, envs_per_worker: int = 8,
                    device: str = "cpu") -> list[EpisodeResult]:
    """Every policy runs every (task, seed): teacher and student face identical initial states. `device`
    (a resolved run.device, "cpu" or "cuda") is where the workers run the policies."""
    # Policy-major, so the round-robin split gives every worker its share of each policy's episodes.
    specs = [EpisodeSpec(name, task, seed) for name in policies for task in tasks for seed in seeds]
    chunks = _split(specs, num_workers)
    # On cuda all workers share one GPU: each steps at most envs_per_worker (8) rows per call and spends most
    # of its time rendering Meta-World on its CPU, so a GPU per worker would sit idle (and need num_workers
    # GPUs); the cost is one CUDA context per worker on that GPU.
    gpus = gpu_share(max(1, len(chunks))) if device == "cuda" else 0
    # Inside a Tune trial, child actors would be captured by the trial's 0.01-CPU placement group and
    # could never be scheduled; the rollout workers reserve their own CPUs instead.
    worker = RolloutWorker.options(num_gpus=gpus,
                                   scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    actors = [worker.remote(policies, image_size, camera, max_steps, envs_per_worker, device) for _ in chunks]
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


def calls_of(results: list[EpisodeResult], policy: str) -> list[int]:
    """Layers run by each closed-loop call of a policy, over all its episodes."""
    return [n for r in results if r.policy == policy for n in r.layers_per_call]


def layer_frequency_over_calls(results: list[EpisodeResult], policy: str) -> list[float]:
    """Per decoder layer, the fraction of the policy's closed-loop calls that ran it: a mean over calls, so a
    long episode weighs what its calls weigh (a mean of per-episode means would let a short one count as much)."""
    mine = [r for r in results if r.policy == policy]
    if not mine:
        return []
    calls = sum(r.steps for r in mine)
    return (np.sum([r.layer_counts for r in mine], axis=0) / calls).tolist()


def recorded_calls(results: list[EpisodeResult], policy: str) -> list[RecordedCall]:
    return [c for r in results if r.policy == policy for c in r.recorded]
