"""The train-teacher job: behaviour-clone a VLA on the trajectory shards with Ray Train + DeepSpeed."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlflow

from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.data.batches import Normalizer
from pipeline.data.manifest import read_manifest
from pipeline.data.shards import open_shards, split_episodes
from pipeline.data.validate import validate_shards
from pipeline.distill.loop import TeacherJob, Tracking, teacher_fn_per_worker
from pipeline.distill.trainer import fit, publish_policy, record_run, train_run
from pipeline.models.checkpoint import policy_hash
from pipeline.models.vla import teacher_config
from pipeline.ray_runtime import is_local, start_ray
from pipeline.tracking.runs import stage_run


@dataclass(frozen=True)
class TeacherResult:
    uri: str
    teacher_hash: str
    final_action_mse: float


def main(cfg: PipelineConfig) -> TeacherResult:
    start_ray(cfg)
    manifest = read_manifest(cfg.shards_uri)
    report = validate_shards(cfg.shards_uri, manifest, cfg.data.on_bad_rows, cache_dir=cfg.stage_dir("validation"))
    train_ids, _ = split_episodes(manifest, cfg.data.val_fraction)
    data = open_shards(cfg.shards_uri, manifest, episodes=train_ids,
                       skip_rows=report.skip_rows).random_shuffle(seed=cfg.run.seed)
    vla = teacher_config(cfg.model, manifest.image_shape, manifest.proprio_dim, manifest.action_dim)
    uri = str(cfg.stage_dir("teacher"))
    ray_run = train_run(cfg, "train-teacher", cfg.stage_dir("ray"))
    with stage_run(cfg, "train-teacher", resume_run_id=ray_run.mlflow_run_id) as run:
        if not ray_run.resumed:
            record_run(ray_run, cfg, "train-teacher", run.info.run_id)
        meta = {"role": "teacher", "normalizer": Normalizer.from_manifest(manifest).to_dict(),
                "data_content_hash": manifest.content_hash, "instructions": manifest.instructions,
                "config_digest": cfg.digest()}
        job = TeacherJob(vla=vla, train=cfg.teacher, normalizer=meta["normalizer"],
                         image_shape=tuple(manifest.image_shape), meta=meta,
                         tracking=Tracking(cfg.tracking_uri, run.info.run_id), seed=cfg.run.seed,
                         pretrained_backbone=cfg.model.pretrained_backbone,
                         ledger_dir=ray_run.ledger_dir if cfg.teacher.ledger else None)
        metrics, checkpoint = fit(teacher_fn_per_worker, job, {"train": data}, cfg.teacher, ray_run,
                                  local=is_local(cfg))
        publish_policy(checkpoint, uri)
        digest = policy_hash(uri)
        mlflow.log_metrics({"final_action_mse": metrics["final_action_mse"],
                            "optimizer_steps": metrics["optimizer_steps"], "train_episodes": len(train_ids)})
        mlflow.set_tags({"teacher_uri": uri, "teacher_hash": digest, "data_content_hash": manifest.content_hash,
                         "ray_run_name": ray_run.name})
    return TeacherResult(uri=uri, teacher_hash=digest, final_action_mse=metrics["final_action_mse"])


if __name__ == "__main__":
    sys.exit(run_cli(main, "train-teacher"))
