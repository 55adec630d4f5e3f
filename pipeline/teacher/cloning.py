"""Behaviour cloning of the teacher VLA on expert actions: the worker loop and the driver that fits it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelSection, PipelineConfig, TrainSection
from pipeline.data import storage
from pipeline.data.augment import random_shift
from pipeline.data.batches import Normalizer, to_model_batch
from pipeline.data.manifest import read_manifest
from pipeline.data.shards import open_shards, shuffle_each_epoch, split_episodes
from pipeline.data.validate import validate_shards
from pipeline.models.action_head import action_task_loss
from pipeline.models.checkpoint import PolicyCard, policy_hash
from pipeline.models.hf_import import load_hf_backbone
from pipeline.models.vla import VLA, VLAConfig, teacher_config
from pipeline.models.vlm_backbone import load_vlm_weights
from pipeline.ray_runtime import is_local
from pipeline.stages import RunPaths
from pipeline.train.device import placement, resolve_device
from pipeline.train.driver import TrainRun, fit, publish_policy
from pipeline.train.engine import building, full_state_dict, init_fresh_decoder, init_worker, make_engine
from pipeline.train.loop import Export, Ledger, MetricLog, Tracking, float_dtype, run_steps


@dataclass(frozen=True)
class TeacherJob:
    """What every train-teacher worker receives: its config sections and what the driver resolved."""

    model: ModelSection
    train: TrainSection
    vla: VLAConfig                      # the architecture, sized from the model section and the manifest
    image_shape: tuple[int, int, int]
    card: PolicyCard                    # the exported teacher's config.json, less the weights
    tracking: Tracking
    seed: int
    ledger_dir: str | None = None       # where rank r appends rank{r}.jsonl (train.ledger); None: no ledger


@dataclass(frozen=True)
class TeacherResult:
    uri: str
    teacher_hash: str
    final_action_mse: float
    optimizer_steps: int
    train_episodes: int
    data_content_hash: str


class _TeacherObjective(nn.Module):
    def __init__(self, vla: VLA) -> None:
        super().__init__()
        self.vla = vla

    def forward(self, images: torch.Tensor, instructions: list[str], proprio: torch.Tensor,
                actions: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The head's own loss (MSE, or cross-entropy over action bins) and, for both heads, the decoded actions'
        MSE as action_mse: the figure the teacher's result reports whichever head it has."""
        out = self.vla(images, instructions, proprio)
        loss, parts = action_task_loss(self.vla.action_head, out.actions, out.action_logits, actions, "action_ce")
        mse = float(F.mse_loss(out.actions.detach().float(), actions))
        return loss, {"action_mse": mse, **({} if out.action_logits is None else parts)}


def teacher_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Behaviour cloning of the teacher VLA on expert actions (normalised MSE)."""
    job: TeacherJob = loop_config["job"]
    torch.manual_seed(job.seed)  # identical initial weights on every rank
    device = ray.train.torch.get_device()   # this worker's GPU when the driver asked for GPUs, else cpu
    init_worker(device)
    with building(job.train, device, job.vla.hidden_size):   # ZeRO-3: partitioned as it is constructed
        vla = VLA(job.vla)
    vla.set_attention(job.model.attention)
    if job.model.pretrained_vlm:
        load_vlm_weights(vla, job.model.pretrained_vlm)        # vision tower, projector and decoder, per tensor
    elif job.model.pretrained_backbone:
        load_hf_backbone(vla, job.model.pretrained_backbone)   # streamed in per tensor from the mapped files
    elif job.train.zero_stage == 3:
        init_fresh_decoder(vla.backbone)
    if job.train.activation_checkpointing:
        vla.checkpoint_layers()
    engine, _ = make_engine(_TeacherObjective(vla), job.train, device=device, hidden_size=job.vla.hidden_size)
    normalizer = Normalizer.from_dict(job.card.normalizer)
    rank = ray.train.get_context().get_world_rank()
    dtype = float_dtype(job.train)

    def step_fn(batch: dict[str, np.ndarray], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        b = to_model_batch(batch, normalizer, job.image_shape)
        images = random_shift(b["images"], job.train.augment_shift)  # run_steps seeds it per rank and micro-batch
        images, proprio = images.to(device, dtype), b["proprio"].to(device, dtype)
        loss, parts = engine(images, b["instructions"], proprio, b["actions"].to(device))
        # placement: GPU runs only (bench/gpu_check.py reads it).
        return loss, {**parts, **placement(engine, device, images, proprio)}

    def state() -> dict[str, torch.Tensor]:
        return full_state_dict(engine, "vla.")

    run_steps(engine, job.train, job.seed, MetricLog(job.tracking, rank == 0), Ledger(job.ledger_dir, rank),
              Export(state, job.vla, job.card), step_fn)


def _anchored(model: ModelSection) -> ModelSection:
    """A local model.pretrained_vlm made absolute: Ray Train workers need not share the driver's directory."""
    if model.pretrained_vlm and not storage.has_scheme(model.pretrained_vlm):
        return model.model_copy(update={"pretrained_vlm": str(Path(model.pretrained_vlm).resolve())})
    return model


def fit_teacher(cfg: PipelineConfig, tracking: Tracking, run: TrainRun) -> TeacherResult:
    """Driver side: validate the shards, behaviour-clone the teacher on the training episodes, publish it."""
    paths = RunPaths.of(cfg)
    manifest = read_manifest(paths.shards)
    report = validate_shards(paths.shards, manifest, cfg.data.on_bad_rows, cache_dir=paths.validation)
    train_ids, _ = split_episodes(manifest, cfg.data.val_fraction)
    data = open_shards(paths.shards, manifest, episodes=train_ids, skip_rows=report.skip_rows,
                       cache=cfg.data.cached)
    data = shuffle_each_epoch(data, cfg.run.seed)
    card = PolicyCard.for_teacher(manifest, cfg.digest())
    model = _anchored(cfg.model)
    job = TeacherJob(model=model, train=cfg.teacher,
                     vla=teacher_config(model, manifest.image_shape, manifest.proprio_dim, manifest.action_dim,
                                        manifest.action_stats),
                     image_shape=tuple(manifest.image_shape), card=card, tracking=tracking, seed=cfg.run.seed,
                     ledger_dir=run.ledger_dir if cfg.teacher.ledger else None)
    metrics, checkpoint = fit(teacher_fn_per_worker, job, {"train": data}, cfg.teacher, run, local=is_local(cfg),
                              device=resolve_device(cfg))
    uri = str(paths.teacher)
    publish_policy(checkpoint, uri)
    return TeacherResult(uri=uri, teacher_hash=policy_hash(uri), final_action_mse=metrics["final_action_mse"],
                         optimizer_steps=int(metrics["optimizer_steps"]), train_episodes=len(train_ids),
                         data_content_hash=manifest.content_hash)
