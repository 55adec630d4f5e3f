"""The device a run computes on: run.device resolved against the machine or Ray cluster (CPU/gloo or GPU/NCCL),
the settings only a GPU can run refused with the fix, and tensors moved onto a worker's device."""

from __future__ import annotations

import importlib.util
import itertools
from typing import Any, Literal

import ray
import torch

from pipeline.config import ConfigError, PipelineConfig

Device = Literal["cpu", "cuda"]

# What every Ray worker process gets in its environment. DS_ACCELERATOR=cpu only when the run is known to be on
# CPU: it silences DeepSpeed's accelerator probe there, and on a GPU it would force DeepSpeed onto the CPU.
BASE_WORKER_ENV = {"MUJOCO_GL": "egl", "TOKENIZERS_PARALLELISM": "false"}


def available_gpus() -> float:
    """GPUs Ray can schedule (the cluster's, or a local Ray's) once connected; before that, this machine's."""
    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0.0))
    return float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0


def resolve_device(cfg: PipelineConfig, gpus: float | None = None) -> Device:
    """run.device as a concrete device given `gpus` (default: available_gpus()); raises one ConfigError naming
    every setting the resolved device cannot run, with the fix. Call it before any worker starts."""
    gpus = available_gpus() if gpus is None else gpus
    where = "the Ray cluster" if ray.is_initialized() else "this machine"
    if cfg.run.device == "cuda" and gpus < 1:
        raise ConfigError(f"run.device=cuda: {where} has no GPU (Ray sees {gpus:g}); run on a GPU machine or "
                          f"cluster, or set run.device=cpu (or auto, which picks cpu here)")
    device: Device = "cuda" if cfg.run.device == "cuda" or (cfg.run.device == "auto" and gpus >= 1) else "cpu"
    problems = _unrunnable(cfg, device)
    if problems:
        raise ConfigError(f"run.device={cfg.run.device} resolves to {device} on {where}; "
                          f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return device


def _unrunnable(cfg: PipelineConfig, device: Device) -> list[str]:
    problems = []
    for key, train in (("teacher", cfg.teacher), ("distill.train", cfg.distill.train)):
        if train.precision == "fp16" and device == "cpu":
            problems.append(f"{key}.precision=fp16: DeepSpeed refuses fp16 on CPU; set {key}.precision=bf16 or "
                            f"fp32, or run on GPUs (run.device=cuda)")
    if cfg.model.attention == "flash_attention_2":
        if device == "cpu":
            problems.append("model.attention=flash_attention_2: FlashAttention runs on GPUs only; set "
                            "model.attention=sdpa, or run on GPUs (run.device=cuda)")
        elif importlib.util.find_spec("flash_attn") is None:
            problems.append("model.attention=flash_attention_2: the flash_attn package is not installed; "
                            "`pip install flash-attn --no-build-isolation` on the GPU machines, or set "
                            "model.attention=sdpa")
    return problems


def worker_env(cfg: PipelineConfig, local: bool) -> dict[str, str]:
    """The env vars of every Ray worker; a local run whose device is cuda fails here, before Ray starts. On a
    cluster with run.device auto/cuda DeepSpeed detects each node's accelerator itself (cpu without CUDA)."""
    cpu = cfg.run.device == "cpu" or (local and resolve_device(cfg) == "cpu")
    return {**BASE_WORKER_ENV, **({"DS_ACCELERATOR": "cpu"} if cpu else {})}


def move(value: Any, device: torch.device) -> Any:
    """Tensors (inside dicts, lists, tuples and NamedTuples too) on `device`; anything else (instruction
    strings) passes through. A no-op for tensors already there (every CPU run)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(move(v, device) for v in value))
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(move(v, device) for v in value)
    return value


def placement(engine: Any, device: torch.device, *inputs: torch.Tensor) -> dict[str, float]:
    """Step metrics of a GPU worker saying where the step ran (what bench/gpu_check.py asserts): on_device is
    1.0 when every parameter of the engine and every input tensor is on `device` (parameters offloaded to host
    RAM count as off it), peak_memory_mib is torch.cuda.max_memory_allocated so far. On CPU: nothing, so a CPU
    run logs what it always logged."""
    if device.type != "cuda":
        return {}
    on = all(t.device == device for t in itertools.chain(engine.module.parameters(), inputs))
    return {"on_device": float(on), "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20}
