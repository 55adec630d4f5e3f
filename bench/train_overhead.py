"""Benchmark: distill-step throughput of a plain single-process PyTorch loop vs the Ray Train + DeepSpeed job.

    MUJOCO_GL=egl .venv/bin/python bench/train_overhead.py          # writes bench/results/train_overhead.json

Same model, same batch size, same rows, same loss, same torch thread count, measured in one run:
- plain: the labelled rows pre-read into memory, then per step the worker's own work
  (to_model_batch, cached teacher targets, StudentObjective forward, backward, torch AdamW step);
- ray: `fit_student` with 1 Ray Train worker, exactly what `actdistill distill` runs (Ray Data streaming
  from the labelled shards, DeepSpeed engine, checkpoint at the end); its samples/s is what the worker logs
  to MLflow (train/samples_per_s per log window, data waits included), first window dropped as warm-up.
Target: overhead = 1 - ray/plain <= 15%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs import collect as collect_job  # noqa: E402
from jobs import distill as distill_job  # noqa: E402
from jobs import probe_teacher as probe_job  # noqa: E402
from pipeline.config import PipelineConfig, load_config  # noqa: E402
from pipeline.data.batches import Normalizer, to_model_batch  # noqa: E402
from pipeline.data.labelled import open_labelled  # noqa: E402
from pipeline.data.manifest import read_manifest  # noqa: E402
from pipeline.data.shards import split_episodes  # noqa: E402
from pipeline.distill.objective import StudentObjective, teacher_targets  # noqa: E402
from pipeline.models.checkpoint import PolicyCard, load_policy, load_probes, save_policy  # noqa: E402
from pipeline.models.student import DistillModule, derive_student  # noqa: E402
from pipeline.models.vla import VLA, teacher_config  # noqa: E402
from pipeline.stages import RunPaths  # noqa: E402
from pipeline.train.engine import warmup_cosine  # noqa: E402

SMOKE = REPO / "jobs" / "configs" / "smoke.yaml"
RESULTS = REPO / "bench" / "results"

# A model whose step costs tens of milliseconds, so the comparison is about per-step overhead, not Python
# start-up: 6 decoder layers of width 128 over 64 patches + 12 words + 2 tokens.
SIZE = ["model.hidden_size=128", "model.num_layers=6", "model.intermediate_size=384", "model.num_heads=4",
        "model.num_kv_heads=2", "model.patch_size=8", "model.graph_width=32", "model.semantic_dim=32"]


def bench_config(run_dir: Path, steps: int, batch: int, zero_stage: int) -> PipelineConfig:
    return load_config(SMOKE, [f"run.run_dir={run_dir}", "collect.episodes_per_task=4", *SIZE,
                               "probe.steps=2", f"distill.train.steps={steps}", f"distill.train.batch_size={batch}",
                               "distill.train.num_workers=1", "distill.train.cpus_per_worker=1",
                               f"distill.train.zero_stage={zero_stage}", "distill.train.log_every=10",
                               "distill.eval_every=0", "run.ray_num_cpus=4"])


def prepare(cfg: PipelineConfig) -> None:
    """Real shards and labelled shards; the teacher is random (its weights do not change the step's cost)."""
    manifest = collect_job.main(cfg)
    torch.manual_seed(0)
    teacher = VLA(teacher_config(cfg.model, manifest.image_shape, manifest.proprio_dim, manifest.action_dim))
    save_policy(teacher, str(RunPaths.of(cfg).teacher), PolicyCard.for_teacher(manifest, cfg.digest()))
    probe_job.main(cfg)


def plain_throughput(cfg: PipelineConfig, warmup: int) -> dict[str, float]:
    """samples/s of the same step in one process, rows already in memory (the ideal the job is held to)."""
    paths, train = RunPaths.of(cfg), cfg.distill.train
    manifest = read_manifest(paths.shards)
    train_ids, _ = split_episodes(manifest, cfg.data.val_fraction)
    rows = open_labelled(paths.labelled, episodes=train_ids).random_shuffle(seed=cfg.run.seed)
    batches = list(rows.iter_batches(batch_size=train.batch_size, batch_format="numpy", drop_last=True))
    torch.manual_seed(cfg.run.seed)
    teacher, card = load_policy(str(paths.teacher))
    probes, _ = load_probes(str(paths.probes))
    student = derive_student(teacher, cfg.router.hidden)
    objective = StudentObjective(DistillModule(student, probes), cfg.router, cfg.distill).train()
    normalizer = Normalizer.from_dict(card.normalizer)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, train.warmup_steps, train.steps))
    layers = student.cfg.num_layers
    started, timed_rows = 0.0, 0
    for step in range(train.steps):
        batch = batches[step % len(batches)]
        if step == warmup:
            started = time.perf_counter()
        b = to_model_batch(batch, normalizer, tuple(manifest.image_shape))
        targets = teacher_targets(batch, card.hash, layers)
        loss, _, _ = objective(b["images"], b["instructions"], b["proprio"], b["actions"], targets, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        optimizer.step()
        schedule.step()
        timed_rows += len(batch["step"]) if step >= warmup else 0
    seconds = time.perf_counter() - started
    return {"samples_per_s": timed_rows / seconds, "timed_steps": train.steps - warmup}


def ray_throughput(cfg: PipelineConfig) -> dict[str, float]:
    """samples/s the distill job's worker logged, after its first log window (warm-up: engine, first batch)."""
    started = time.perf_counter()
    result = distill_job.main(cfg)
    wall = time.perf_counter() - started
    client = MlflowClient(cfg.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              filter_string="tags.stage = 'distill'", order_by=["attributes.start_time DESC"])
    def after_warmup(key: str) -> list[float]:
        history = sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)
        return [m.value for m in history[1:]]

    rates = after_warmup("train/samples_per_s")
    steps = cfg.distill.train.steps
    return {"samples_per_s": float(np.mean(rates)), "windows": len(rates), "job_wall_s": wall,
            "data_wait_fraction": float(np.mean(after_warmup("train/data_wait_fraction"))),
            "end_to_end_samples_per_s": steps * cfg.distill.train.batch_size / wall,
            "optimizer_steps": result.metrics["optimizer_steps"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--zero-stage", type=int, default=2, help="DeepSpeed ZeRO stage of the Ray job")
    parser.add_argument("--out", default=str(RESULTS / "train_overhead.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    # One compute thread on both sides: Ray gives a 1-CPU worker OMP_NUM_THREADS=1, and the second core is
    # what Ray Data's reads run on.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(Path(tmp) / "run", args.steps, args.batch_size, args.zero_stage)
        prepare(cfg)
        # plain, Ray, plain again: on a shared machine the load drifts, and the two plain figures show by
        # how much; the overhead is taken against their mean.
        before = plain_throughput(cfg, warmup=cfg.distill.train.log_every)
        ray_side = ray_throughput(cfg)
        after = plain_throughput(cfg, warmup=cfg.distill.train.log_every)
    plain = {"samples_per_s": (before["samples_per_s"] + after["samples_per_s"]) / 2,
             "before_ray": before["samples_per_s"], "after_ray": after["samples_per_s"]}
    overhead = 1.0 - ray_side["samples_per_s"] / plain["samples_per_s"]
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "steps": args.steps,
                              "batch_size": args.batch_size, "zero_stage": args.zero_stage, "plain": plain,
                              "ray_deepspeed_1_worker": ray_side, "overhead": overhead, "target": 0.15}
    print(f"plain PyTorch loop          {plain['samples_per_s']:8.1f} samples/s "
          f"(before {before['samples_per_s']:.1f}, after {after['samples_per_s']:.1f})")
    print(f"Ray Train + DeepSpeed (1 w) {ray_side['samples_per_s']:8.1f} samples/s "
          f"(ZeRO-{args.zero_stage}; waiting for data {ray_side['data_wait_fraction']:.1%} of the time; "
          f"whole job incl. start-up: {ray_side['end_to_end_samples_per_s']:.1f})")
    print(f"overhead {overhead:.1%} (target <= 15%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
