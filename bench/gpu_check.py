"""The first command on a GPU machine: the smoke config's train-teacher, distill and evaluate on one GPU, checked.

    python bench/gpu_check.py                      # ~5-8 min on one GPU; collects the smoke shards first
    python bench/gpu_check.py --shards runs/smoke/shards   # reuse a run folder's shards
    python bench/gpu_check.py --cpu-only-dry-run   # no GPU needed: the CPU parts only (what CI can run)

What it checks, in order:
1. fp32, same seed, one worker: train-teacher on the CPU (the reference) and on the GPU; every logged loss
   (train/action_mse at each optimizer step) must agree within --rtol of the CPU value (+1e-3 absolute). The GPU
   differs by reduction order and cuDNN's TF32 convolutions (the vision stem), not by the algorithm.
2. run.device=cuda, bf16, activation checkpointing, sdpa: train-teacher, probe-teacher and distill. Each step
   records whether every engine parameter and input tensor was on the worker's GPU (on_device) and the peak
   torch.cuda.max_memory_allocated; both must hold for train-teacher and distill.
3. Peak GPU memory against `actdistill plan` for the same config on this GPU (the option with the configured
   ZeRO stage): more than --memory-slack x the prediction is a mismatch (the plan must never under-predict).
   samples/s is printed with the FLOP/s it implies (plan's FLOPs per sample); at smoke size a GPU is
   launch-bound, so throughput is reported, not judged.
4. evaluate of that run with run.device=cuda (1 episode per task, at most 50 steps: the rollout workers share
   the GPU): report.json must exist and give the student's latency, measured on cuda.

Exit codes: 0 every check passed; 1 a mismatch (each is listed) or a job failed; 2 bad arguments;
3 no GPU on this machine (with --cpu-only-dry-run: the CPU parts ran and passed, nothing was checked on a GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.config import PipelineConfig, load_config  # noqa: E402

SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
NO_GPU, MISMATCH = 3, 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/gpu_check", help="folder for every run this check writes")
    parser.add_argument("--shards", default=None, help="an existing shards folder (e.g. runs/smoke/shards); "
                                                       "default: collect the smoke shards into --run-dir")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per training run (default 20)")
    parser.add_argument("--rtol", type=float, default=0.02,
                        help="GPU vs CPU fp32 loss: allowed relative difference per logged step (default 0.02)")
    parser.add_argument("--memory-slack", type=float, default=1.2,
                        help="measured peak GPU memory may reach this multiple of the plan's (default 1.2)")
    parser.add_argument("--cpu-only-dry-run", action="store_true",
                        help="run only the CPU parts (configs, shards, the CPU reference run) and exit 3")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.rtol <= 0 or args.memory_slack < 1:
        parser.error("--steps must be >= 2, --rtol > 0 and --memory-slack >= 1")
    return args


@dataclass
class Configs:
    """Every run of the check, built and validated up front (a bad one stops the check before any Ray work)."""

    collect: PipelineConfig
    cpu_fp32: PipelineConfig
    gpu_fp32: PipelineConfig
    gpu_bf16: PipelineConfig


def build_configs(args: argparse.Namespace) -> Configs:
    root = Path(args.run_dir).resolve()
    shards = Path(args.shards).resolve() if args.shards else root / "shards"
    common = [f"data.shards_uri={shards}", "run.name=gpu-check", f"teacher.steps={args.steps}",
              f"distill.train.steps={args.steps}", "teacher.log_every=1", "distill.train.log_every=1",
              # one GPU: one worker per job (and the same single worker on the CPU, so the curves compare)
              "teacher.num_workers=1", "distill.train.num_workers=1", "distill.eval_every=0"]

    def make(name: str, *more: str) -> PipelineConfig:
        return load_config(SMOKE, [*common, f"run.run_dir={root / name}", *more])

    fp32 = ["teacher.precision=fp32", "model.attention=sdpa"]
    gpu = ["run.device=cuda", "teacher.precision=bf16", "distill.train.precision=bf16",
           "teacher.activation_checkpointing=true", "distill.train.activation_checkpointing=true",
           "model.attention=sdpa", "evaluate.episodes_per_task=1", "evaluate.max_steps=50"]
    return Configs(collect=load_config(SMOKE, [f"run.run_dir={root}"]),
                   cpu_fp32=make("cpu_fp32", "run.device=cpu", *fp32),
                   gpu_fp32=make("gpu_fp32", "run.device=cuda", *fp32), gpu_bf16=make("gpu_bf16", *gpu))


def ensure_shards(cfgs: Configs, args: argparse.Namespace) -> None:
    if args.shards:
        if not (Path(args.shards) / "manifest.json").is_file():
            raise SystemExit(f"--shards {args.shards}: no manifest.json there; pass a run folder's shards "
                             f"(e.g. runs/smoke/shards) or leave --shards out to collect them")
        return
    if (Path(cfgs.collect.run.run_dir) / "shards" / "manifest.json").is_file():
        return
    from jobs import collect

    print("collecting the smoke shards (Meta-World experts, ~1-2 min)", flush=True)
    collect.main(cfgs.collect)


def restart_ray(cfg: PipelineConfig) -> None:
    """Worker env vars are fixed when Ray starts (DS_ACCELERATOR=cpu only for a CPU run): a fresh Ray per device."""
    import ray

    from pipeline.ray_runtime import start_ray

    if ray.is_initialized():
        ray.shutdown()
    start_ray(cfg)


@dataclass
class Measured:
    losses: list[float]
    samples_per_s: float
    final: dict[str, float] = field(default_factory=dict)


def _stage_metrics(cfg: PipelineConfig, stage: str, loss_key: str) -> Measured:
    """The loss curve, mean samples/s and final_* metrics of the run's one MLflow run of `stage`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}'", order_by=["start_time DESC"],
                              max_results=1)
    if not runs:
        raise RuntimeError(f"no MLflow run of {stage} in {cfg.tracking_uri}")
    run = runs[0]
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, loss_key), key=lambda m: m.step)]
    speed = [m.value for m in client.get_metric_history(run.info.run_id, "train/samples_per_s")]
    # The first logged step includes Ray Data's warm-up and CUDA's kernel selection: left out of samples/s.
    return Measured(losses, sum(speed[1:]) / max(1, len(speed) - 1) if len(speed) > 1 else float("nan"),
                    {k: v for k, v in run.data.metrics.items() if k.startswith("final_")})


def train_teacher(cfg: PipelineConfig) -> Measured:
    from jobs import train_teacher as job

    started = time.perf_counter()
    job.main(cfg)
    print(f"  train-teacher on {cfg.run.device}, {cfg.teacher.precision}: {time.perf_counter() - started:.0f} s",
          flush=True)
    return _stage_metrics(cfg, "train-teacher", "train/action_mse")


def probe_and_distill(cfg: PipelineConfig) -> Measured:
    from jobs import distill, probe_teacher

    started = time.perf_counter()
    probe_teacher.main(cfg)
    distill.main(cfg)
    print(f"  probe-teacher + distill on {cfg.run.device}: {time.perf_counter() - started:.0f} s", flush=True)
    return _stage_metrics(cfg, "distill", "train/total")


def evaluate(cfg: PipelineConfig) -> list[str]:
    """The evaluate job on the run's teacher and student; its report must give the student's latency on cuda."""
    from jobs import evaluate as job
    from pipeline.evaluate.report import EvaluationReport
    from pipeline.stages import RunPaths

    started = time.perf_counter()
    job.main(cfg)
    print(f"  evaluate on {cfg.run.device}: {time.perf_counter() - started:.0f} s", flush=True)
    path = RunPaths.of(cfg).evaluate / "report.json"
    if not path.is_file():
        return [f"evaluate: no report at {path}"]
    report = EvaluationReport.read(path)
    student = report.policies.get("student")
    where = next((v for k, v in (report.measured_on or {}).items() if "latency_ms_median" in k), "")
    if student is None or not student.latency_ms_median > 0:
        return [f"evaluate: {path} gives no student latency"]
    print(f"  evaluate: student {student.latency_ms_median:.2f} ms median batch-1 latency; measured: {where}")
    return [] if " on cuda (" in where else [f"evaluate: the latency was not measured on cuda: {where!r}"]


def compare_curves(cpu: list[float], gpu: list[float], rtol: float) -> list[str]:
    if len(cpu) != len(gpu) or not cpu:
        return [f"fp32 loss curves differ in length: CPU {len(cpu)} logged steps, GPU {len(gpu)}"]
    worst = max(abs(g - c) / (abs(c) + 1e-3 / rtol) for c, g in zip(cpu, gpu))
    print(f"  fp32 loss, CPU vs GPU over {len(cpu)} steps: worst relative difference {worst:.4f} "
          f"(tolerance {rtol}); first {cpu[0]:.4f} vs {gpu[0]:.4f}, last {cpu[-1]:.4f} vs {gpu[-1]:.4f}")
    return [] if worst <= rtol else [f"fp32 loss curves differ: worst relative difference {worst:.4f} > {rtol}"]


def check_placement(name: str, measured: Measured) -> list[str]:
    on = measured.final.get("final_on_device")
    if on != 1.0:
        return [f"{name}: parameters or batches off the GPU (final_on_device={on}; missing means the steps "
                f"ran on the CPU)"]
    return []


def check_memory(name: str, cfg: PipelineConfig, job: str, measured: Measured, slack: float) -> list[str]:
    """Measured peak vs the plan's peak for the configured ZeRO stage without offload, on this GPU."""
    from pipeline.data.manifest import read_manifest
    from pipeline.plan import make_cluster, make_plan
    from pipeline.stages import RunPaths

    manifest = read_manifest(RunPaths.of(cfg).shards)
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = make_plan(cfg, make_cluster(1, gib), job=job, image_size=manifest.image_shape[0],
                     proprio_dim=manifest.proprio_dim, action_dim=manifest.action_dim)
    train = plan.train
    fit = next(f for f in plan.fits[plan.teacher_mode] if f.option.stage == train.zero_stage
               and not f.option.offload_optimizer)
    peak_mib, planned_mib = measured.final.get("final_peak_memory_mib", float("nan")), fit.total / 2**20
    flops = plan.flops["train_step"] * measured.samples_per_s
    print(f"  {name}: {measured.samples_per_s:,.0f} samples/s ({flops / 1e12:.3f} TFLOP/s by the plan's "
          f"{plan.flops['train_step'] / 1e9:.2f} GFLOPs per sample); peak GPU memory {peak_mib:,.0f} MiB, "
          f"plan ({fit.option.name}, bf16, no activation checkpointing) {planned_mib:,.0f} MiB")
    if not peak_mib <= slack * planned_mib:
        return [f"{name}: peak GPU memory {peak_mib:,.0f} MiB > {slack} x the plan's {planned_mib:,.0f} MiB"]
    return []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfgs = build_configs(args)
    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu_only_dry_run:
        print("NO GPU: torch sees no CUDA device on this machine, so nothing can be checked. Run this on a GPU "
              "machine, or pass --cpu-only-dry-run to exercise the CPU parts only.")
        return NO_GPU
    ensure_shards(cfgs, args)
    print("1. fp32 loss curves, CPU reference", flush=True)
    restart_ray(cfgs.cpu_fp32)
    cpu = train_teacher(cfgs.cpu_fp32)
    if not cpu.losses or any(x != x for x in cpu.losses):
        print(f"MISMATCH: the CPU reference run logged no finite losses: {cpu.losses}")
        return MISMATCH
    if not gpu:
        print(f"NO GPU: the CPU parts ran (configs, shards, a {len(cpu.losses)}-step CPU reference run, loss "
              f"{cpu.losses[0]:.4f} -> {cpu.losses[-1]:.4f}); nothing was checked on a GPU.")
        return NO_GPU
    restart_ray(cfgs.gpu_fp32)
    problems = compare_curves(cpu.losses, train_teacher(cfgs.gpu_fp32).losses, args.rtol)
    print("2. bf16, activation checkpointing, sdpa on the GPU", flush=True)
    teacher = train_teacher(cfgs.gpu_bf16)
    student = probe_and_distill(cfgs.gpu_bf16)
    problems += check_placement("train-teacher", teacher) + check_placement("distill", student)
    print("3. throughput and memory against `actdistill plan`", flush=True)
    problems += check_memory("train-teacher", cfgs.gpu_bf16, "train-teacher", teacher, args.memory_slack)
    problems += check_memory("distill", cfgs.gpu_bf16, "distill", student, args.memory_slack)
    print("4. evaluate on the GPU", flush=True)
    problems += evaluate(cfgs.gpu_bf16)
    for problem in problems:
        print(f"MISMATCH: {problem}")
    print("GPU CHECK PASSED" if not problems else f"GPU CHECK FAILED: {len(problems)} mismatch(es)")
    return MISMATCH if problems else 0


if __name__ == "__main__":
    sys.exit(main())
