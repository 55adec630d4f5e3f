"""Driver side of stage 2: check the teacher's labels, distill the routed student, publish it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray.data

from pipeline.config import PipelineConfig
from pipeline.data import storage
from pipeline.data.labelled import check_teacher, open_labelled, read_labels
from pipeline.data.manifest import Manifest, read_manifest
from pipeline.data.shards import open_shards, split_episodes
from pipeline.data.validate import validate_shards
from pipeline.distill.loop import StudentJob, Tracking, student_fn_per_worker
from pipeline.distill.losses import LossWeights
from pipeline.distill.trainer import TrainRun, fit, publish_policy
from pipeline.models.checkpoint import PROBES_CONFIG, policy_hash, read_policy_config, read_probes_config
from pipeline.ray_runtime import is_local


@dataclass(frozen=True)
class DistillResult:
    student_uri: str
    teacher_hash: str
    metrics: dict[str, float]


def loss_weights(cfg: PipelineConfig) -> LossWeights:
    d = cfg.distill
    return LossWeights(alpha=d.alpha, beta=d.beta, eta=d.eta, gamma=d.gamma, budget_weight=d.budget_weight,
                       balance_weight=d.balance_weight, budget=cfg.router.budget,
                       budget_per_input=cfg.router.budget_scope == "input")


def check_probes(probes_uri: str, teacher_hash: str) -> None:
    """The stage-1 probes are the student's heads and, online, the teacher's labellers: same teacher only."""
    made_by = read_probes_config(probes_uri).get("teacher_hash")
    if made_by != teacher_hash:
        raise ValueError(f"{storage.join(probes_uri, PROBES_CONFIG)}: the probes were trained on teacher "
                         f"{made_by}, but the teacher checkpoint "
                         f"is {teacher_hash}; re-run `actdistill probe-teacher` for this teacher")


def _datasets(cfg: PipelineConfig, manifest: Manifest, teacher_hash: str) -> dict[str, ray.data.Dataset]:
    """cached: probe-teacher's labelled shards (refused if another teacher made them); online: raw shards."""
    train_ids, val_ids = split_episodes(manifest, cfg.data.val_fraction)
    if cfg.distill.teacher_mode == "cached":
        check_teacher(read_labels(cfg.labelled_uri), teacher_hash, cfg.labelled_uri)

        def rows(ids: set[str]) -> ray.data.Dataset:
            return open_labelled(cfg.labelled_uri, episodes=ids)
    else:
        report = validate_shards(cfg.shards_uri, manifest, cfg.data.on_bad_rows,
                                 cache_dir=cfg.stage_dir("validation"))

        def rows(ids: set[str]) -> ray.data.Dataset:
            return open_shards(cfg.shards_uri, manifest, episodes=ids, skip_rows=report.skip_rows)
    datasets = {"train": rows(train_ids).random_shuffle(seed=cfg.run.seed)}
    if val_ids and cfg.distill.eval_every:
        datasets["val"] = rows(val_ids)
    return datasets


def fit_student(cfg: PipelineConfig, tracking: Tracking, student_uri: str, run: TrainRun,
                reserved: float = 0.0, callbacks: list[Any] | None = None) -> DistillResult:
    """Labels or probes made by another teacher are refused before any worker starts."""
    teacher_uri = str(cfg.stage_dir("teacher"))
    teacher_hash = policy_hash(teacher_uri)
    probes_uri = str(cfg.stage_dir("probes"))
    check_probes(probes_uri, teacher_hash)
    manifest = read_manifest(cfg.shards_uri)
    datasets = _datasets(cfg, manifest, teacher_hash)
    job = StudentJob(teacher_uri=teacher_uri, teacher_hash=teacher_hash, probes_uri=probes_uri,
                     router_hidden=cfg.router.hidden, threshold=cfg.router.threshold, gate=cfg.router.gate,
                     anneal_to=cfg.router.anneal_to,
                     weights=loss_weights(cfg), train=cfg.distill.train, image_shape=tuple(manifest.image_shape),
                     meta={"role": "student", "teacher_hash": teacher_hash, "router_budget": cfg.router.budget,
                           "threshold": cfg.router.threshold, "data_content_hash": manifest.content_hash,
                           "config_digest": cfg.digest(), "normalizer": read_policy_config(teacher_uri)["normalizer"],
                           "instructions": manifest.instructions},
                     tracking=tracking, seed=cfg.run.seed,
                     eval_every=cfg.distill.eval_every if "val" in datasets else 0,
                     teacher_mode=cfg.distill.teacher_mode,
                     ledger_dir=run.ledger_dir if cfg.distill.train.ledger else None,
                     objective=cfg.distill.objective,
                     static_layers=tuple(cfg.router.static_layers) if cfg.router.static_layers else None,
                     router_lr=cfg.router.lr)
    metrics, checkpoint = fit(student_fn_per_worker, job, datasets, cfg.distill.train, run,
                              local=is_local(cfg), reserved=reserved, callbacks=callbacks)
    publish_policy(checkpoint, student_uri)
    return DistillResult(student_uri=student_uri, teacher_hash=teacher_hash,
                         metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
