"""The collect job: scripted Meta-World experts -> Parquet trajectory shards + manifest, tracked in MLflow."""

from __future__ import annotations

import sys
import time

import mlflow

from pipeline.cli import run_cli
from pipeline.config import PipelineConfig
from pipeline.data.manifest import Manifest
from pipeline.data.shards import write_shards
from pipeline.ray_runtime import start_ray
from pipeline.sim.collect import collect_episodes
from pipeline.stages import RunPaths
from pipeline.tracking.runs import stage_run


def main(cfg: PipelineConfig) -> Manifest:
    start_ray(cfg)
    shards = RunPaths.of(cfg).shards
    with stage_run(cfg, "collect"):
        started = time.perf_counter()
        episodes, dropped = collect_episodes(cfg.collect)
        manifest = write_shards(episodes, shards, cfg.collect.rows_per_shard, dropped)
        attempted = manifest.num_episodes + dropped
        succeeded = sum(e.success for e in manifest.episodes)
        mlflow.log_metrics({
            "episodes": manifest.num_episodes,
            "steps": manifest.num_steps,
            "dropped_episodes": dropped,
            "expert_success_fraction": succeeded / attempted,
            "seconds": time.perf_counter() - started,
        })
        # The hash names the exact data every later stage trains on.
        mlflow.set_tags({"shards_uri": shards, "content_hash": manifest.content_hash})
    return manifest


if __name__ == "__main__":
    sys.exit(run_cli(main, "collect"))
