"""Benchmark: rows/s Ray Data feeds 2 Ray Train workers (local disk, S3) vs rows/s a distill step consumes.

    MUJOCO_GL=egl .venv/bin/python bench/ingest.py   # writes bench/results/ingest.json

Generates its own Meta-World shards, serves an S3 API with moto on 127.0.0.1 (stopped at the end),
and runs each worker the way training does: open_shards, then get_dataset_shard("train").iter_batches +
to_model_batch. Target: ingest >= 3x consumption, so data loading never stalls a distill step. Each source
is measured as training opens it (cached in the object store, the default at this size) and streamed
from storage on every pass (open_shards(cache=False), what a dataset too big to cache gets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import ray
import torch
import torch.distributed as dist
import torch.nn.functional as F
from moto.server import ThreadedMotoServer
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.config import CollectSection, PipelineConfig, load_config
from pipeline.data.batches import Normalizer, to_model_batch
from pipeline.data.manifest import Manifest
from pipeline.data.shards import open_shards, write_shards
from pipeline.distill.losses import LossWeights, distill_loss
from pipeline.models.router import budget_gates, forward_mode
from pipeline.models.student import DistillModule, derive_student
from pipeline.models.vla import VLA, teacher_config
from pipeline.ray_runtime import WORKER_ENV
from pipeline.sim.collect import collect_episodes
from pipeline.teacher.probing import new_probes

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "configs" / "smoke.yaml"
RESULTS = REPO / "bench" / "results"
BUCKET = "actdistill-bench"


def ingest_fn_per_worker(config: dict[str, Any]) -> None:
    """Runs on each train worker: stream its shard `epochs` times as the training loop does, timing each
    pass and its first batch (each pass restarts the streaming executor)."""
    shard = ray.train.get_dataset_shard("train")
    normalizer = Normalizer.from_dict(config["normalizer"])
    epochs = config["epochs"]
    rows, seconds, first = (torch.zeros(epochs, dtype=torch.float64) for _ in range(3))
    for epoch in range(epochs):
        start = time.perf_counter()
        for batch in shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy"):
            rows[epoch] += len(to_model_batch(batch, normalizer, config["image_shape"])["step"])
            if not first[epoch]:
                first[epoch] = time.perf_counter() - start
        seconds[epoch] = time.perf_counter() - start
    dist.all_reduce(rows, op=dist.ReduceOp.SUM)  # rows of both workers
    for t in (seconds, first):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slower worker decides the wall time
    metrics = {"rows": rows.tolist(), "seconds": seconds.tolist(), "first_batch_seconds": first.tolist()}
    # Train V2 surfaces metrics through checkpoints only: rank 0 attaches a tiny one.
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            (Path(folder) / "metrics.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def _rates(m: dict[str, list[float]], open_seconds: float) -> dict[str, Any]:
    """Cold = opening the shards (reading them into the cache, when cached) plus the first pass (fresh worker
    processes); warm = later passes, each one's start-up included. The wait for each pass's first batch is
    reported too: it is what a training step would wait at an epoch boundary."""
    rows, secs, first = (np.asarray(m[k]) for k in ("rows", "seconds", "first_batch_seconds"))
    warm = slice(1, None) if len(rows) > 1 else slice(None)
    return {"rows_per_pass": float(rows[0]), "open_seconds": round(open_seconds, 3),
            "pass_seconds": secs.round(3).tolist(), "first_batch_seconds": first.round(3).tolist(),
            "cold_rows_per_s": float(rows[0] / (open_seconds + secs[0])),
            "warm_rows_per_s": float(rows[warm].sum() / secs[warm].sum()),
            "warm_first_batch_seconds": float(first[warm].mean())}


def measure_ingest(uri: str, manifest: Manifest, batch_size: int, epochs: int, storage: Path,
                   cache: bool | None) -> dict[str, Any]:
    """Driver side: a 2-worker TorchTrainer (0.5 CPU each, leaving Ray Data room) over the shards at uri."""
    started = time.perf_counter()
    data = open_shards(uri, manifest, cache=cache)
    open_seconds = time.perf_counter() - started
    trainer = TorchTrainer(
        ingest_fn_per_worker,
        train_loop_config={"normalizer": Normalizer.from_manifest(manifest).to_dict(), "epochs": epochs,
                           "image_shape": tuple(manifest.image_shape), "batch_size": batch_size},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
        datasets={"train": data},
        run_config=RunConfig(name=f"ingest-{'s3' if uri.startswith('s3://') else 'local'}-{cache}",
                             storage_path=str(storage)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"ingest run over {uri} failed: {result.error}") from result.error
    return _rates(result.metrics, open_seconds)


def measure_consumption(cfg: PipelineConfig, manifest: Manifest, steps: int, threads: int) -> dict[str, float]:
    """Rows/s one smoke-size distill step (student forward + probes + loss + backward + AdamW) consumes."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    teacher = VLA(teacher_config(cfg.model, manifest.image_shape, manifest.proprio_dim, manifest.action_dim))
    module = DistillModule(derive_student(teacher, cfg.router.hidden), new_probes(teacher, cfg.model))
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.distill.train.lr)
    b, (h, w, c), layers = cfg.distill.train.batch_size, manifest.image_shape, cfg.model.num_layers
    images, proprio = torch.rand(b, c, h, w), torch.randn(b, manifest.proprio_dim)
    actions, instructions = torch.randn(b, manifest.action_dim), ["push the puck to the goal"] * b
    sem_t = torch.randn(layers, b, cfg.model.semantic_dim)
    act_t = torch.randn(layers, b, manifest.action_dim)
    weights = LossWeights(budget=cfg.router.budget)

    def step() -> None:
        out, sem_s, act_s = module(images, instructions, proprio, forward_mode(cfg.router.gate),
                                   cfg.router.threshold)
        loss, _ = distill_loss(F.mse_loss(out.actions, actions), actions, sem_s, act_s, sem_t, act_t,
                               budget_gates(out.gates, cfg.router.gate, cfg.router.threshold), weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocator and autograd graph caches
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    return {"batch_size": b, "threads": threads, "seconds_per_step": seconds, "rows_per_s": b / seconds}


def make_shards(cfg: CollectSection, copies: int, local_uri: str, s3_uri: str) -> Manifest:
    """Real expert episodes, each stored `copies` times under new ids: a few seconds of simulation give a
    dataset (~4k rows, 48 MB) big enough that per-pass start-up costs show against the rows delivered."""
    episodes, dropped = collect_episodes(cfg)
    episodes = [dataclasses.replace(ep, episode_id=f"{ep.episode_id}/copy{i}") for i in range(copies)
                for ep in episodes]
    manifest = write_shards(episodes, local_uri, cfg.rows_per_shard, dropped)
    write_shards(episodes, s3_uri, cfg.rows_per_shard, dropped)
    return manifest


def start_s3() -> tuple[ThreadedMotoServer, str]:
    """A moto S3 server on loopback, its endpoint exported before ray.init so workers inherit it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return server, endpoint


def write_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ignore = path.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# benchmark outputs are machine-specific; never committed\n*\n")
    path.write_text(json.dumps(results, indent=2) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(SMOKE)
    collect = cfg.collect.model_copy(update={"tasks": ["reach-v3", "push-v3", "drawer-open-v3"],
                                             "episodes_per_task": args.episodes_per_task, "keep_failed": True})
    server, endpoint = start_s3()
    try:
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"env_vars": WORKER_ENV})
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
            manifest = make_shards(collect, args.copies, str(Path(tmp) / "shards"), f"s3://{BUCKET}/shards")
            batch = cfg.distill.train.batch_size
            ingest = {f"{name}_{mode}": measure_ingest(uri, manifest, batch, args.epochs, Path(tmp) / "ray", cache)
                      for name, uri in (("local", str(Path(tmp) / "shards")), ("s3", f"s3://{BUCKET}/shards"))
                      for mode, cache in (("as_opened", None), ("streamed", False))}
        ray.shutdown()
    finally:
        server.stop()
    # Each of the 2 workers owns about one core, so one worker's step runs on one thread.
    per_worker = measure_consumption(cfg, manifest, args.steps, threads=1)
    consume_2 = 2 * per_worker["rows_per_s"]
    return {
        "dataset": {"rows": manifest.num_steps, "episodes": manifest.num_episodes, "shards": len(manifest.shards),
                    "image_shape": manifest.image_shape, "epochs_streamed": args.epochs},
        "ingest_2_workers": ingest, "s3_endpoint": endpoint,
        "consumption_one_worker": per_worker, "consumption_2_workers_rows_per_s": consume_2,
        # Warm rate: what a long training run sees, one stream restart per pass over the data included.
        "ratios": {key: r["warm_rows_per_s"] / consume_2 for key, r in ingest.items()},
        "target_ratio": 3.0, "load_average": os.getloadavg(), "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes-per-task", type=int, default=2, help="expert episodes of 3 tasks (~70 rows each)")
    p.add_argument("--copies", type=int, default=10, help="times each episode is stored (more rows to stream)")
    p.add_argument("--epochs", type=int, default=4, help="passes each worker streams over its shard; the first "
                                                         "is cold, the rest give the warm rate")
    p.add_argument("--steps", type=int, default=5, help="distill steps timed for consumption")
    p.add_argument("--out", type=Path, default=RESULTS / "ingest.json")
    args = p.parse_args(argv)
    results = run(args)
    write_results(results, args.out)
    consume = results["consumption_2_workers_rows_per_s"]
    for name, r in results["ingest_2_workers"].items():
        print(f"ingest into 2 workers, {name:15s}: {r['warm_rows_per_s']:6.0f} rows/s over warm passes (first "
              f"batch after {r['warm_first_batch_seconds']:.2f} s), {r['cold_rows_per_s']:6.0f} rows/s cold (open "
              f"{r['open_seconds']:.1f} s + first pass); {r['rows_per_pass']:.0f} rows per pass")
    print(f"distill consumption, 2 workers x 1 thread: {consume:.0f} rows/s "
          f"({results['consumption_one_worker']['seconds_per_step'] * 1e3:.0f} ms per step of "
          f"{results['consumption_one_worker']['batch_size']} rows per worker)")
    ratios = ", ".join(f"{name} {ratio:.1f}x" for name, ratio in results["ratios"].items())
    print(f"ratio warm ingest/consumption: {ratios} (target >= 3x); load average "
          f"{results['load_average'][0]:.1f} on {results['cpus']} CPUs")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
