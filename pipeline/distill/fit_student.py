"""Driver side of stage 2: check the teacher's labels, distill the routed student, publish it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.data.labelled import check_teacher, open_labelled, read_labels
from pipeline.data.manifest import read_manifest
from pipeline.data.shards import split_episodes
from pipeline.distill.loop import StudentJob, Tracking, student_fn_per_worker
from pipeline.distill.losses import LossWeights
from pipeline.distill.trainer import fit, publish_policy
from pipeline.ray_runtime import is_local
from pipeline.models.checkpoint import policy_hash, read_policy_config


@dataclass(frozen=True)
class DistillResult:
    student_uri: str
    teacher_hash: str
    metrics: dict[str, float]


def loss_weights(cfg: PipelineConfig) -> LossWeights:
    d = cfg.distill
    return LossWeights(alpha=d.alpha, beta=d.beta, eta=d.eta, gamma=d.gamma, budget_weight=d.budget_weight,
                       balance_weight=d.balance_weight, budget=cfg.router.budget)


def fit_student(cfg: PipelineConfig, tracking: Tracking, student_uri: str, name: str,
                storage_path: Path, reserved: float = 0.0, callbacks: list[Any] | None = None) -> DistillResult:
    """Labels made by another teacher are refused before any worker starts."""
    teacher_uri = str(cfg.stage_dir("teacher"))
    teacher_hash = policy_hash(teacher_uri)
    labels = read_labels(cfg.labelled_uri)
    check_teacher(labels, teacher_hash, cfg.labelled_uri)
    manifest = read_manifest(cfg.shards_uri)
    train_ids, val_ids = split_episodes(manifest, cfg.data.val_fraction)
    datasets = {"train": open_labelled(cfg.labelled_uri, episodes=train_ids).random_shuffle(seed=cfg.run.seed)}
    if val_ids and cfg.distill.eval_every:
        datasets["val"] = open_labelled(cfg.labelled_uri, episodes=val_ids)
    job = StudentJob(teacher_uri=teacher_uri, teacher_hash=teacher_hash, probes_uri=str(cfg.stage_dir("probes")),
                     router_hidden=cfg.router.hidden, threshold=cfg.router.threshold, gate=cfg.router.gate,
                     anneal_to=cfg.router.anneal_to,
                     weights=loss_weights(cfg), train=cfg.distill.train, image_shape=tuple(manifest.image_shape),
                     meta={"role": "student", "teacher_hash": teacher_hash, "router_budget": cfg.router.budget,
                           "threshold": cfg.router.threshold, "data_content_hash": manifest.content_hash,
                           "config_digest": cfg.digest(), "normalizer": read_policy_config(teacher_uri)["normalizer"],
                           "instructions": manifest.instructions},
                     tracking=tracking, seed=cfg.run.seed,
                     eval_every=cfg.distill.eval_every if "val" in datasets else 0)
    metrics, checkpoint = fit(student_fn_per_worker, job, datasets, cfg.distill.train, name=name,
                              storage_path=storage_path, local=is_local(cfg), reserved=reserved,
                              callbacks=callbacks)
    publish_policy(checkpoint, student_uri)
    return DistillResult(student_uri=student_uri, teacher_hash=teacher_hash,
                         metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

