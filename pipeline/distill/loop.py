"""Per-worker training loops (run on every Ray Train worker): teacher training and student distillation."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline.config import TrainSection
from pipeline.data.augment import random_shift
from pipeline.data.batches import Normalizer, to_model_batch
from pipeline.distill.engine import close_engine, full_state_dict, make_engine
from pipeline.distill.losses import LossWeights, distill_loss, regression_loss
from pipeline.models.checkpoint import load_policy, load_probes, save_state
from pipeline.models.graph import ProbeSet
from pipeline.models.hf_import import load_hf_backbone
from pipeline.models.router import TrainGate, anneal_temperature, budget_gates, forward_mode
from pipeline.models.student import DistillModule, derive_student
from pipeline.models.vla import VLA, VLAConfig


# Inside every Ray checkpoint: DeepSpeed's resumable state (one shard per rank), the exported policy
# (model.safetensors + config.json, from rank 0) and the progress (optimizer steps done, metrics).
DEEPSPEED_DIR, PROGRESS = "deepspeed", "progress.json"


@dataclass(frozen=True)
class Tracking:
    """Where rank 0 logs step metrics (the driver created the run)."""

    uri: str
    run_id: str


@dataclass(frozen=True)
class TeacherJob:
    vla: VLAConfig
    train: TrainSection
    normalizer: dict[str, Any]
    image_shape: tuple[int, int, int]
    meta: dict[str, Any]
    tracking: Tracking
    seed: int
    pretrained_backbone: str | None = None
    ledger_dir: str | None = None       # where rank r appends rank{r}.jsonl (train.ledger); None: no ledger


@dataclass(frozen=True)
class StudentJob:
    teacher_uri: str
    teacher_hash: str
    probes_uri: str
    router_hidden: int
    threshold: float
    gate: TrainGate
    anneal_to: float
    weights: LossWeights
    train: TrainSection
    image_shape: tuple[int, int, int]
    meta: dict[str, Any]
    tracking: Tracking
    seed: int
    eval_every: int = 0          # optimizer steps between validation reports (0: none)
    teacher_mode: str = "cached"  # cached: targets from labelled shards; online: teacher runs in the step
    ledger_dir: str | None = None
    objective: str = "actdistill"  # or action_regression (ablation: no graph supervision)
    static_layers: tuple[int, ...] | None = None  # a fixed layer subset instead of a router (ablation)
    router_lr: float | None = None  # the router's peak LR; None: train.lr like the rest


class _MetricLog:
    """Rank-0-only side effects sit behind this one flag."""

    def __init__(self, tracking: Tracking, enabled: bool) -> None:
        self.client = MlflowClient(tracking.uri) if enabled else None
        self.run_id = tracking.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), step=step)


class _Ledger:
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


def _float_dtype(train: TrainSection) -> torch.dtype:
    return torch.bfloat16 if train.precision == "bf16" else torch.float32


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
class _Export:
    """What every checkpoint carries besides the DeepSpeed state: the policy as it would be published."""

    state: Callable[[], dict[str, torch.Tensor]]   # collective under ZeRO-3: every rank calls it
    vla: VLAConfig
    meta: dict[str, Any]


def _checkpoint(engine: Any, step: int, export: _Export, metrics: dict[str, float]) -> None:
    """Every rank writes its DeepSpeed shard and reports; rank 0 adds the exported policy and progress.
    Ray merges the per-rank folders into one checkpoint and keeps the last train.keep_checkpoints."""
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(str(Path(tmp) / DEEPSPEED_DIR), tag=f"step{step:08d}", client_state={"step": step})
        state = export.state()
        if rank == 0:
            save_state(state, export.vla, tmp, export.meta)
            (Path(tmp) / PROGRESS).write_text(json.dumps({"step": step, "metrics": metrics}))
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


StepFn = Callable[[dict[str, np.ndarray], int], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[int], dict[str, float]]


def _train(engine: Any, train: TrainSection, seed: int, log: _MetricLog, ledger: _Ledger, export: _Export,
           step_fn: StepFn, eval_fn: EvalFn | None = None, eval_every: int = 0) -> None:
    """The optimizer-step loop both stages share: resume, accumulate, log, validate, checkpoint, finish.

    `step_fn(batch, step)` returns the micro-batch loss and its scalar parts; randomness is seeded per
    micro-batch from (seed, index), so a resumed run draws exactly what an uninterrupted one would."""
    accum = train.grad_accum
    step, last = _restore(engine)
    history: list[dict[str, float]] = []
    window_start, window_rows, waited = time.perf_counter(), 0, 0.0
    ready = time.perf_counter()
    for micro, batch in enumerate(_micro_batches(train.batch_size, train.steps * accum, step * accum, seed),
                                  start=step * accum):
        waited += time.perf_counter() - ready
        torch.manual_seed(seed * 1_000_003 + micro)
        loss, parts = step_fn(batch, step)
        engine.backward(loss)
        engine.step()
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
            log.log({**_mean(recent, "train/"), "train/lr": engine.get_lr()[0],
                     "train/samples_per_s": window_rows / elapsed, "train/data_wait_fraction": waited / elapsed},
                    step)
            window_start, window_rows, waited = time.perf_counter(), 0, 0.0
        if eval_fn is not None and eval_every and step % eval_every == 0:
            # Every rank reports (a barrier); Tune's ASHA reads rank 0's val_action_mse.
            ray.train.report(eval_fn(step))
        if train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.steps:
            _checkpoint(engine, step, export, _final(history))
        ready = time.perf_counter()
    metrics = _final(history) if history else last
    metrics["optimizer_steps"] = step
    if eval_fn is not None and eval_every:
        # The final report carries the metric too: under Tune every result must have what ASHA ranks.
        metrics.update(eval_fn(step))
    _checkpoint(engine, step, export, metrics)
    close_engine(engine)


def _mean(history: list[dict[str, float]], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(np.mean([h[k] for h in history])) for k in history[0]} if history else {}


def _final(history: list[dict[str, float]]) -> dict[str, float]:
    """final_* metrics: the mean over the last fifth of the micro-batches trained so far."""
    return _mean(history[-max(1, len(history) // 5):], "final_")


class _TeacherObjective(nn.Module):
    def __init__(self, vla: VLA) -> None:
        super().__init__()
        self.vla = vla

    def forward(self, images: torch.Tensor, instructions: list[str], proprio: torch.Tensor,
                actions: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.vla(images, instructions, proprio).actions.float(), actions)


def teacher_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Behaviour cloning of the teacher VLA on expert actions (normalised MSE)."""
    job: TeacherJob = loop_config["job"]
    torch.manual_seed(job.seed)  # identical initial weights on every rank
    vla = VLA(job.vla)
    if job.pretrained_backbone:
        load_hf_backbone(vla, job.pretrained_backbone)
    engine, _ = make_engine(_TeacherObjective(vla), job.train)
    normalizer = Normalizer.from_dict(job.normalizer)
    rank = ray.train.get_context().get_world_rank()
    dtype = _float_dtype(job.train)

    def step_fn(batch: dict[str, np.ndarray], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        b = to_model_batch(batch, normalizer, job.image_shape)
        images = random_shift(b["images"], job.train.augment_shift)  # seeded per micro-batch by _train
        loss = engine(images.to(dtype), b["instructions"], b["proprio"].to(dtype), b["actions"])
        return loss, {"action_mse": float(loss)}

    def state() -> dict[str, torch.Tensor]:
        return {k.removeprefix("vla."): v for k, v in full_state_dict(engine).items()}

    _train(engine, job.train, job.seed, _MetricLog(job.tracking, rank == 0), _Ledger(job.ledger_dir, rank),
           _Export(state, job.vla, job.meta), step_fn)


class TeacherTargets(NamedTuple):
    """What the ungated teacher says about a batch (normalised units): cached labels or computed online."""

    sem: torch.Tensor       # L x B x S per-layer semantics (stage-1 probes on the teacher's hidden states)
    act: torch.Tensor       # L x B x A per-layer actions of the same probes
    action: torch.Tensor    # B x A the teacher's own action


class StudentObjective(nn.Module):
    """The stage-2 loss around the student; in online mode it also holds the frozen teacher and the
    stage-1 probes that turn its hidden states into targets (partitioned with the student under ZeRO-3)."""

    def __init__(self, distill: DistillModule, job: StudentJob, teacher: VLA | None = None,
                 teacher_probes: ProbeSet | None = None) -> None:
        super().__init__()
        self.distill, self.job = distill, job
        self.teacher, self.teacher_probes = teacher, teacher_probes
        if teacher is not None and teacher_probes is not None:
            teacher.requires_grad_(False)
            teacher_probes.requires_grad_(False)

    def train(self, mode: bool = True) -> StudentObjective:
        # The targets come from the teacher in eval mode, as probe-teacher's cached labels do.
        super().train(mode)
        for frozen in (self.teacher, self.teacher_probes):
            if frozen is not None:
                frozen.eval()
        return self

    @torch.no_grad()
    def online_targets(self, images: torch.Tensor, instructions: list[str], proprio: torch.Tensor
                       ) -> TeacherTargets:
        """The ungated teacher's targets for this batch, as probe-teacher labels them."""
        if self.teacher is None or self.teacher_probes is None:
            raise RuntimeError("online teacher targets need the teacher and its probes in the objective")
        out = self.teacher(images, instructions, proprio, mode="off", record=True)
        sem, act = self.teacher_probes(out.hidden, out.token_mask)
        return TeacherTargets(sem.float(), act.float(), out.actions.float())

    def forward(self, images: torch.Tensor, instructions: list[str], proprio: torch.Tensor,
                actions: torch.Tensor, targets: TeacherTargets | None,
                temperature: float) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        job = self.job
        if targets is None:
            targets = self.online_targets(images, instructions, proprio)
        mode = forward_mode(job.gate)
        if job.objective == "action_regression":
            out = self.distill.student(images, instructions, proprio, mode=mode, threshold=job.threshold,
                                       temperature=temperature)
            gates = out.gates
            loss, parts = regression_loss(out.actions.float(), actions, targets.action,
                                          budget_gates(gates, job.gate, job.threshold).float(), job.weights)
        else:
            pred, sem_s, act_s, gates = self.distill(images, instructions, proprio, mode, job.threshold,
                                                     temperature)
            loss, parts = distill_loss(pred.float(), actions, sem_s.float(), act_s.float(), targets.sem,
                                       targets.act, budget_gates(gates, job.gate, job.threshold).float(),
                                       job.weights)
        return loss, parts, (gates >= job.threshold).float().mean()


def teacher_targets(batch: dict[str, np.ndarray], job: StudentJob, layers: int) -> TeacherTargets:
    """Cached teacher targets of this batch, refusing another teacher's labels."""
    hashes = set(np.asarray(batch["teacher_hash"]).astype(str).tolist())
    if hashes != {job.teacher_hash}:
        raise ValueError(f"labelled rows were made by teacher(s) {sorted(hashes)}, but distillation uses "
                         f"teacher {job.teacher_hash}; re-run `actdistill probe-teacher` for this teacher")
    batch_size = len(batch["teacher_hash"])
    sem = torch.as_tensor(np.asarray(batch["teacher_sem"], dtype=np.float32)).view(batch_size, layers, -1)
    act = torch.as_tensor(np.asarray(batch["teacher_act"], dtype=np.float32)).view(batch_size, layers, -1)
    action = torch.as_tensor(np.asarray(batch["teacher_action"], dtype=np.float32)).view(batch_size, -1)
    return TeacherTargets(sem.transpose(0, 1), act.transpose(0, 1), action)


@torch.no_grad()
def _val_action_mse(student: VLA, normalizer: Normalizer, job: StudentJob, dtype: torch.dtype) -> float:
    """Held-out action MSE of the student as deployed (hard gates), all-reduced over the workers."""
    student.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=job.train.batch_size,
                                                                  batch_format="numpy"):
        b = to_model_batch(batch, normalizer, job.image_shape)
        out = student(b["images"].to(dtype), b["instructions"], b["proprio"].to(dtype), mode="hard",
                      threshold=job.threshold)
        totals[0] += float(((out.actions.float() - b["actions"]) ** 2).sum())
        totals[1] += b["actions"].numel()
    student.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def _student_objective(job: StudentJob) -> tuple[StudentObjective, dict[str, Any]]:
    """Student = teacher weights + router + stage-1 probes; online mode adds frozen copies of both."""
    teacher, teacher_meta = load_policy(job.teacher_uri)
    probes, _ = load_probes(job.probes_uri)
    student = derive_student(teacher, job.router_hidden, job.static_layers)
    if job.objective == "action_regression":
        probes.requires_grad_(False)   # no per-layer terms: the probes get no gradient and are not exported
    if job.teacher_mode == "cached":
        return StudentObjective(DistillModule(student, probes), job), teacher_meta
    # The frozen copy is taken before training touches the student's probes: the labellers of stage 1.
    return StudentObjective(DistillModule(student, probes), job, teacher, copy.deepcopy(probes)), teacher_meta


def student_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Stage 2: the routed student (teacher weights + router + stage-1 probes) under the ActDistill loss."""
    job: StudentJob = loop_config["job"]
    torch.manual_seed(job.seed)
    objective, teacher_meta = _student_objective(job)
    student_cfg = objective.distill.student.cfg
    own_lr = {"distill.student.router": job.router_lr} if job.router_lr else None
    engine, _ = make_engine(objective, job.train, own_lr)
    normalizer = Normalizer.from_dict(teacher_meta["normalizer"])
    rank = ray.train.get_context().get_world_rank()
    log = _MetricLog(job.tracking, rank == 0)
    dtype = _float_dtype(job.train)

    def step_fn(batch: dict[str, np.ndarray], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        b = to_model_batch(batch, normalizer, job.image_shape)
        targets = teacher_targets(batch, job, student_cfg.num_layers) if job.teacher_mode == "cached" else None
        # Shifts only in online mode (the config refuses them with cached labels): there the frozen teacher
        # labels the same shifted images inside the objective. Seeded per micro-batch by _train.
        images = random_shift(b["images"], job.train.augment_shift)
        temperature = anneal_temperature(step, job.train.steps, job.anneal_to) if job.gate == "annealed" else 1.0
        loss, parts, executed = engine(images.to(dtype), b["instructions"], b["proprio"].to(dtype),
                                       b["actions"], targets, temperature)
        return loss, {**parts, "executed_fraction": float(executed)}

    def eval_fn(step: int) -> dict[str, float]:
        val = _val_action_mse(engine.module.distill.student, normalizer, job, dtype)
        log.log({"val/action_mse": val}, step)
        return {"val_action_mse": val, "step": step}

    def state() -> dict[str, torch.Tensor]:
        prefix = "distill.student."
        return {k.removeprefix(prefix): v for k, v in full_state_dict(engine).items() if k.startswith(prefix)}

    _train(engine, job.train, job.seed, log, _Ledger(job.ledger_dir, rank), _Export(state, student_cfg, job.meta),
           step_fn, eval_fn, job.eval_every)
