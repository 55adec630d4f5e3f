"""Per-worker training loops (run on every Ray Train worker): teacher training and student distillation."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline.config import TrainSection
from pipeline.data.batches import Normalizer, to_model_batch
from pipeline.distill.engine import close_engine, full_state_dict, make_engine
from pipeline.distill.losses import LossWeights, distill_loss
from pipeline.models.checkpoint import load_policy, load_probes, save_state
from pipeline.models.hf_import import load_hf_backbone
from pipeline.models.router import TrainGate, anneal_temperature, budget_gates, forward_mode
from pipeline.models.student import DistillModule, derive_student
from pipeline.models.vla import VLA, VLAConfig


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


def _micro_batches(batch_size: int, count: int) -> Iterator[dict[str, np.ndarray]]:
    """Exactly `count` micro-batches from this worker's shard, looping over epochs."""
    shard = ray.train.get_dataset_shard("train")
    done = 0
    while done < count:
        seen = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
            seen += 1
            yield batch
            done += 1
            if done == count:
                return
        if seen == 0:
            raise ValueError(f"this worker's data shard holds fewer rows than one batch ({batch_size}); "
                             f"lower the batch_size or collect more episodes")


def _float_dtype(train: TrainSection) -> torch.dtype:
    return torch.bfloat16 if train.precision == "bf16" else torch.float32


def _finish(engine: Any, export: dict[str, torch.Tensor], vla_cfg: VLAConfig, meta: dict[str, Any],
            metrics: dict[str, float]) -> None:
    """Rank 0 writes the exported policy into the reported checkpoint; every rank reports once."""
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_state(export, vla_cfg, tmp, meta)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
    close_engine(engine)


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
    log = _MetricLog(job.tracking, ray.train.get_context().get_world_rank() == 0)
    dtype, accum, losses = _float_dtype(job.train), job.train.grad_accum, []
    for micro, batch in enumerate(_micro_batches(job.train.batch_size, job.train.steps * accum)):
        b = to_model_batch(batch, normalizer, job.image_shape)
        loss = engine(b["images"].to(dtype), b["instructions"], b["proprio"].to(dtype), b["actions"])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        step = (micro + 1) // accum
        if (micro + 1) % accum == 0 and step % job.train.log_every == 0:
            log.log({"train/action_mse": float(np.mean(losses[-job.train.log_every * accum:])),
                     "train/lr": engine.get_lr()[0]}, step)
    state = {k.removeprefix("vla."): v for k, v in full_state_dict(engine).items()}
    metrics = {"final_action_mse": float(np.mean(losses[-max(1, len(losses) // 5):])),
               "optimizer_steps": job.train.steps}
    _finish(engine, state, job.vla, job.meta, metrics)


class _StudentObjective(nn.Module):
    def __init__(self, distill: DistillModule, job: StudentJob) -> None:
        super().__init__()
        self.distill, self.job = distill, job

    def forward(self, images: torch.Tensor, instructions: list[str], proprio: torch.Tensor,
                actions: torch.Tensor, sem_t: torch.Tensor, act_t: torch.Tensor, temperature: float
                ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        job = self.job
        pred, sem_s, act_s, gates = self.distill(images, instructions, proprio, forward_mode(job.gate),
                                                 job.threshold, temperature)
        loss, parts = distill_loss(pred.float(), actions, sem_s.float(), act_s.float(), sem_t, act_t,
                                   budget_gates(gates, job.gate, job.threshold).float(), job.weights)
        return loss, parts, (gates >= job.threshold).float().mean()


def _teacher_targets(batch: dict[str, np.ndarray], job: StudentJob, layers: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached per-layer teacher semantics/actions of this batch, refusing another teacher's labels."""
    hashes = set(np.asarray(batch["teacher_hash"]).astype(str).tolist())
    if hashes != {job.teacher_hash}:
        raise ValueError(f"labelled rows were made by teacher(s) {sorted(hashes)}, but distillation uses "
                         f"teacher {job.teacher_hash}; re-run `actdistill probe-teacher` for this teacher")
    batch_size = len(batch["teacher_hash"])
    sem = torch.as_tensor(np.asarray(batch["teacher_sem"], dtype=np.float32)).view(batch_size, layers, -1)
    act = torch.as_tensor(np.asarray(batch["teacher_act"], dtype=np.float32)).view(batch_size, layers, -1)
    return sem.transpose(0, 1), act.transpose(0, 1)


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


def student_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Stage 2: the routed student (teacher weights + router + stage-1 probes) under the ActDistill loss."""
    job: StudentJob = loop_config["job"]
    torch.manual_seed(job.seed)
    teacher, teacher_meta = load_policy(job.teacher_uri)
    probes, _ = load_probes(job.probes_uri)
    student = derive_student(teacher, job.router_hidden)
    engine, _ = make_engine(_StudentObjective(DistillModule(student, probes), job), job.train)
    normalizer = Normalizer.from_dict(teacher_meta["normalizer"])
    log = _MetricLog(job.tracking, ray.train.get_context().get_world_rank() == 0)
    dtype, accum, layers = _float_dtype(job.train), job.train.grad_accum, student.cfg.num_layers
    history: list[dict[str, float]] = []
    for micro, batch in enumerate(_micro_batches(job.train.batch_size, job.train.steps * accum)):
        b = to_model_batch(batch, normalizer, job.image_shape)
        sem_t, act_t = _teacher_targets(batch, job, layers)
        temperature = anneal_temperature(micro // accum, job.train.steps, job.anneal_to) \
            if job.gate == "annealed" else 1.0
        loss, parts, executed = engine(b["images"].to(dtype), b["instructions"], b["proprio"].to(dtype),
                                       b["actions"], sem_t, act_t, temperature)
        engine.backward(loss)
        engine.step()
        history.append({**parts, "executed_fraction": float(executed)})
        step = (micro + 1) // accum
        if (micro + 1) % accum == 0 and step % job.train.log_every == 0:
            recent = history[-job.train.log_every * accum:]
            log.log({f"train/{k}": float(np.mean([h[k] for h in recent])) for k in recent[0]}, step)
        if job.eval_every and (micro + 1) % accum == 0 and step % job.eval_every == 0:
            # Every rank reports (a barrier); Tune's ASHA reads rank 0's val_action_mse.
            val = _val_action_mse(engine.module.distill.student, normalizer, job, dtype)
            log.log({"val/action_mse": val}, step)
            ray.train.report({"val_action_mse": val, "step": step})
    tail = history[-max(1, len(history) // 5):]
    metrics = {f"final_{k}": float(np.mean([h[k] for h in tail])) for k in tail[0]}
    metrics["optimizer_steps"] = job.train.steps
    if job.eval_every:
        # The final report carries the metric too: under Tune every result must have what ASHA ranks.
        metrics["val_action_mse"] = _val_action_mse(engine.module.distill.student, normalizer, job, dtype)
    prefix = "distill.student."
    state = {k.removeprefix(prefix): v for k, v in full_state_dict(engine).items() if k.startswith(prefix)}
    _finish(engine, state, student.cfg, job.meta, metrics)
