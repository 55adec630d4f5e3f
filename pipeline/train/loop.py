"""The step loop every trained stage shares (runs on each Ray Train worker): resume, accumulate, log,
validate, checkpoint, and the per-rank ledger of the rows trained on."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch

from pipeline.config import PipelineConfig, TrainSection
from pipeline.models.checkpoint import PolicyCard, save_state
from pipeline.models.vla import VLAConfig
from pipeline.tracking.metrics import MetricSender
from pipeline.train.engine import TRAIN_DTYPES, close_engine

# Inside every Ray checkpoint: DeepSpeed's resumable state (one shard per rank), the exported policy
# (model.safetensors + config.json, from rank 0) and the progress (optimizer steps done, metrics).
DEEPSPEED_DIR, PROGRESS = "deepspeed", "progress.json"


@dataclass(frozen=True)
class Tracking:
    """Where rank 0 logs step metrics (the driver created the run)."""

    uri: str
    run_id: str
    outage_limit_s: float = 300.0   # tracking.outage_limit_s: how long metrics may wait for an unreachable server

    @classmethod
    def of(cls, cfg: PipelineConfig, run_id: str) -> Tracking:
        return cls(cfg.tracking_uri, run_id, cfg.tracking.outage_limit_s)


class MetricLog:
    """Rank-0-only side effects sit behind this one flag. Metrics go through a background sender
    (pipeline/tracking/metrics.py): a tracking outage neither stops nor slows the step loop, up to the limit."""

    def __init__(self, tracking: Tracking, enabled: bool) -> None:
        self.sender = MetricSender(tracking.uri, tracking.run_id, tracking.outage_limit_s) if enabled else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.sender is not None:
            self.sender.log(metrics, step)

    def close(self) -> None:
        """Deliver what waits (through an outage, up to its limit); the run's metrics are complete after this."""
        if self.sender is not None:
            self.sender.close()


class Ledger:
    """Per rank, one line per optimizer step: a digest of the (episode_id, step) keys it trained on and the
    worker's pid. Comparing ledgers shows whether a restarted run lost or repeated any data."""

    def __init__(self, folder: str | None, rank: int) -> None:
        self.path = Path(folder) / f"rank{rank}.jsonl" if folder else None
        self.keys: list[str] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        if self.path is not None:
            self.keys += [f"{e}/{s}" for e, s in zip(np.asarray(batch["episode_id"]).astype(str).tolist(),
                                                      np.asarray(batch["step"]).tolist())]

    def close_step(self, step: int) -> None:
        if self.path is None:
            return
        digest = hashlib.sha256("\n".join(self.keys).encode()).hexdigest()[:16]
        line = {"step": step, "rows": len(self.keys), "digest": digest, "pid": os.getpid()}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        self.keys = []


def _micro_batches(batch_size: int, count: int, skip: int, seed: int
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Micro-batches `skip`..`count`-1 of this worker's stream, looping over epochs.

    The stream is the same on every attempt (replayable_data_config; the local shuffle is seeded by
    epoch), so skipping the micro-batches a checkpoint already consumed resumes at the exact data
    position: no row lost, none trained on twice. Skipping re-reads those rows without computing on them;
    a very long run would rather skip whole epochs."""
    if skip >= count:   # a finished run resumed: nothing left to train on
        return
    shard = ray.train.get_dataset_shard("train")
    done, epoch = 0, 0
    while done < count:
        seen = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=8 * batch_size,
                                        local_shuffle_seed=seed * 10_000 + epoch):
            seen += 1
            if done >= skip:
                yield batch
            done += 1
            if done == count:
                return
        if seen == 0:
            raise ValueError(f"this worker's data shard holds fewer rows than one batch ({batch_size}); "
                             f"lower the batch_size or collect more episodes")
        epoch += 1


class Progress:
    """Rank 0's one line per train.log_every optimizer steps on stdout (Ray forwards a worker's stdout to
    the driver's): `teacher step 20/40  loss 0.4123  310 samples/s  ETA 0:01:05`."""

    def __init__(self, name: str, steps: int, start: int, world_size: int, enabled: bool) -> None:
        self.name, self.steps, self.start, self.world_size, self.enabled = name, steps, start, world_size, enabled
        self.began = time.perf_counter()
        self.losses: list[float] = []

    def add(self, loss: torch.Tensor) -> None:
        if self.enabled:
            self.losses.append(float(loss.detach()))

    def show(self, step: int, samples_per_s: float) -> None:
        if not self.enabled:
            return
        per_step = (time.perf_counter() - self.began) / max(1, step - self.start)
        eta = time.strftime("%H:%M:%S", time.gmtime(per_step * (self.steps - step)))
        loss = float(np.mean(self.losses)) if self.losses else float("nan")
        # sys.stdout, not print(): Ray Train patches print() in workers to tee into its logger (two lines).
        sys.stdout.write(f"{self.name} step {step}/{self.steps}  loss {loss:.4f}  "
                         f"{samples_per_s * self.world_size:.0f} samples/s  ETA {eta}\n")
        sys.stdout.flush()
        self.losses = []


def micro_batch_seed(seed: int, rank: int, micro: int) -> int:
    """The torch seed of one micro-batch on one rank: augmentation (random_shift) and any other draw in the
    step differ across ranks (with the run seed and micro-batch alone, both ranks shifted their images by
    the same offsets) and across micro-batches, yet a resumed run redraws exactly what it drew before."""
    return int(np.random.SeedSequence((seed, rank, micro)).generate_state(1, np.uint64)[0] >> 1)


def float_dtype(train: TrainSection) -> torch.dtype:
    return TRAIN_DTYPES[train.precision]


def _restore(engine: Any) -> tuple[int, dict[str, float]]:
    """Load the run's latest checkpoint (weights, optimizer, LR schedule) into the engine; returns the
    optimizer steps it had done and the metrics it reported. (0, {}) for a fresh run."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {}
    with checkpoint.as_directory() as folder:
        # DeepSpeed's loader unpickles (torch.load): these files were written by this very run into its
        # own storage path, never taken from elsewhere.
        engine.load_checkpoint(str(Path(folder) / DEEPSPEED_DIR), load_module_strict=True)
        progress = json.loads((Path(folder) / PROGRESS).read_text())
    return int(progress["step"]), dict(progress["metrics"])


@dataclass
class Export:
    """What every checkpoint carries besides the DeepSpeed state: the policy as it would be published."""

    state: Callable[[], dict[str, torch.Tensor]]   # collective under ZeRO-3: every rank calls it
    vla: VLAConfig
    card: PolicyCard


def _checkpoint(engine: Any, step: int, export: Export, metrics: dict[str, float]) -> None:
    """Every rank writes its DeepSpeed shard and reports; rank 0 adds the exported policy and progress.
    Ray merges the per-rank folders into one checkpoint and keeps the last train.keep_checkpoints."""
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(str(Path(tmp) / DEEPSPEED_DIR), tag=f"step{step:08d}", client_state={"step": step})
        state = export.state()
        if rank == 0:
            save_state(state, export.vla, tmp, export.card)
            (Path(tmp) / PROGRESS).write_text(json.dumps({"step": step, "metrics": metrics}))
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


StepFn = Callable[[dict[str, np.ndarray], int], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[int], dict[str, float]]


def run_steps(engine: Any, train: TrainSection, seed: int, log: MetricLog, ledger: Ledger, export: Export,
              step_fn: StepFn, eval_fn: EvalFn | None = None, eval_every: int = 0) -> None:
    """The optimizer-step loop both stages share: resume, accumulate, log, validate, checkpoint, finish.

    `step_fn(batch, step)` returns the micro-batch loss and its scalar parts; randomness is seeded per
    micro-batch from (seed, rank, index), so a resumed run draws exactly what an uninterrupted one would."""
    accum = train.grad_accum
    context = ray.train.get_context()
    rank = context.get_world_rank()
    step, last = _restore(engine)
    progress = Progress(export.card.role or "train", train.steps, step, context.get_world_size(), enabled=rank == 0)
    history: list[dict[str, float]] = []
    window_start, window_rows, waited = time.perf_counter(), 0, 0.0
    ready = time.perf_counter()
    for micro, batch in enumerate(_micro_batches(train.batch_size, train.steps * accum, step * accum, seed),
                                  start=step * accum):
        waited += time.perf_counter() - ready
        torch.manual_seed(micro_batch_seed(seed, rank, micro))
        loss, parts = step_fn(batch, step)
        engine.backward(loss)
        engine.step()
        progress.add(loss)
        history.append(parts)
        ledger.add(batch)
        window_rows += len(batch["step"])
        if (micro + 1) % accum:
            ready = time.perf_counter()
            continue
        step += 1
        ledger.close_step(step)
        if step % train.log_every == 0:
            recent = history[-train.log_every * accum:]
            # samples/s of this rank, data waits included (what bench/train_overhead.py compares), and the
            # share of that time spent waiting for Ray Data: above ~0.05 the input pipeline is the bottleneck.
            elapsed = time.perf_counter() - window_start
            progress.show(step, window_rows / elapsed)
            log.log({**_mean(recent, "train/"), "train/lr": engine.get_lr()[0],
                     "train/samples_per_s": window_rows / elapsed, "train/data_wait_fraction": waited / elapsed},
                    step)
            window_start, window_rows, waited = time.perf_counter(), 0, 0.0
        if eval_fn is not None and eval_every and step % eval_every == 0:
            # Every rank reports (a barrier); Tune's ASHA reads rank 0's val_action_mse.
            ray.train.report(eval_fn(step))
        if train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.steps:
            _checkpoint(engine, step, export, final_metrics(history))
        ready = time.perf_counter()
    metrics = final_metrics(history) if history else last
    metrics["optimizer_steps"] = step
    if eval_fn is not None and eval_every:
        # The final report carries the metric too: under Tune every result must have what ASHA ranks.
        metrics.update(eval_fn(step))
    _checkpoint(engine, step, export, metrics)
    try:
        log.close()   # after the final checkpoint: a tracking outage past its limit fails the stage, no step lost
    finally:
        close_engine(engine)


def _mean(history: list[dict[str, float]], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(np.mean([h[k] for h in history])) for k in history[0]} if history else {}


def final_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """final_* metrics: the mean over the last fifth of the micro-batches trained so far."""
    return _mean(history[-max(1, len(history) // 5):], "final_")
