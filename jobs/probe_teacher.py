"""The probe-teacher job: stage-1 probes on the frozen teacher, then labelled shards through Ray Data."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlflow
import numpy as np

from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.data.batches import Normalizer
from pipeline.data.labelled import Labels, clear, open_labelled, write_labels
from pipeline.data.manifest import read_manifest
from pipeline.data.shards import open_shards, split_episodes
from pipeline.data.validate import validate_shards
from pipeline.distill.probing import fit_probes, label_rows, new_probes
from pipeline.models.checkpoint import load_policy, save_probes
from pipeline.ray_runtime import start_ray
from pipeline.tracking.runs import stage_run


@dataclass(frozen=True)
class ProbeResult:
    probes_uri: str
    labelled_uri: str
    rows: int
    final_probe_mse: float


def main(cfg: PipelineConfig) -> ProbeResult:
    start_ray(cfg)
    teacher_uri, probes_uri = str(cfg.stage_dir("teacher")), str(cfg.stage_dir("probes"))
    manifest = read_manifest(cfg.shards_uri)
    # Same checks as train-teacher (stored in the run, so a later stage reuses them): a bad shard stops the
    # job naming file, row and fix, or with data.on_bad_rows=skip its bad rows are left out and counted.
    report = validate_shards(cfg.shards_uri, manifest, cfg.data.on_bad_rows, cache_dir=cfg.stage_dir("validation"))
    teacher, meta = load_policy(teacher_uri)
    if manifest.content_hash != meta["data_content_hash"]:
        raise ValueError(f"the teacher at {teacher_uri} was trained on data {meta['data_content_hash']}, but "
                         f"{cfg.shards_uri} holds {manifest.content_hash}; re-run train-teacher")
    train_ids, _ = split_episodes(manifest, cfg.data.val_fraction)
    image_shape = tuple(manifest.image_shape)
    with stage_run(cfg, "probe-teacher"):
        probes = new_probes(teacher, cfg.model)
        train_rows = open_shards(cfg.shards_uri, manifest, episodes=train_ids, skip_rows=report.skip_rows)
        losses = fit_probes(teacher, probes, train_rows, cfg.probe, Normalizer.from_dict(meta["normalizer"]),
                            image_shape, cfg.run.seed)
        for step in range(0, len(losses), 10):
            mlflow.log_metric("probe/action_mse", losses[step], step=step)
        save_probes(probes, probes_uri, {"teacher_hash": meta["weights_sha256_16"]})
        # Every row (train and validation) gets labels; distill picks its split by episode id.
        clear(cfg.labelled_uri)
        labelled = label_rows(open_shards(cfg.shards_uri, manifest, skip_rows=report.skip_rows, cache=False),
                              teacher_uri, probes_uri, meta["weights_sha256_16"], image_shape, cfg.probe.batch_size)
        labelled.write_parquet(cfg.labelled_uri)
        # Counted from the files as written (one pass, nothing cached); bad rows left out are not expected.
        written, expected = open_labelled(cfg.labelled_uri, cache=False).count(), manifest.num_steps - report.num_bad
        if written != expected:
            raise RuntimeError(f"labelled {written} rows but the shards hold {expected} usable rows "
                               f"({report.num_bad} bad); see the Ray Data logs above and re-run probe-teacher")
        labels = Labels(teacher_hash=meta["weights_sha256_16"], source_content_hash=manifest.content_hash,
                        num_layers=teacher.cfg.num_layers, semantic_dim=cfg.model.semantic_dim,
                        action_dim=teacher.cfg.action_dim, num_rows=written)
        write_labels(cfg.labelled_uri, labels)
        final = float(np.mean(losses[-max(1, len(losses) // 5):]))
        mlflow.log_metrics({"final_probe_mse": final, "labelled_rows": written, "skipped_bad_rows": report.num_bad})
        mlflow.set_tags({"teacher_hash": labels.teacher_hash, "labelled_uri": cfg.labelled_uri})
    return ProbeResult(probes_uri=probes_uri, labelled_uri=cfg.labelled_uri, rows=written,
                       final_probe_mse=final)


if __name__ == "__main__":
    sys.exit(run_cli(main, "probe-teacher"))
