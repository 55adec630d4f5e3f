"""DeepSpeed on Ray Train workers: the config built from TrainSection, and engine setup/teardown."""

from __future__ import annotations

import gc
import importlib
import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import TrainSection


def deepspeed_config(train: TrainSection, device: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed JSON config for one job on `device` (cpu or cuda; also what `plan` writes for a cluster)."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    host = {"device": "cpu", "pin_memory": True}
    if train.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = dict(host)
    if train.offload == "all":
        zero["offload_param"] = dict(host)
    config = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        # torch AdamW is a client optimizer: no JIT-compiled FusedAdam/CPUAdam (45-70 s first use).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train.precision == "fp16":
        # loss_scale 0: dynamic loss scaling from 2^16, halved on overflow (that step skipped), doubled after
        # 1000 clean steps.
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    if train.offload != "none" and device == "cpu":
        # DeepSpeed refuses a client optimizer under offload unless told it is intended (its own
        # DeepSpeedCPUAdam is documented as 5-7x faster than torch's AdamW on the CPU side).
        config["zero_force_ds_cpu_optimizer"] = False
    elif train.offload != "none":
        # On GPUs the offloaded optimizer is DeepSpeed's own CPU Adam (built once, ~1 min JIT, then cached).
        config["optimizer"] = {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": train.weight_decay}}
    return config


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up, then cosine decay to 10% of the peak."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _skip_shm_comm_build() -> None:
    # deepspeed.comm.torch builds its shm all-reduce op at init (~50 s JIT on a fresh machine) and
    # training over gloo never uses it. `import deepspeed.comm.torch as m` would bind the real torch
    # module (name clash), hence importlib.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _match_accelerator(kind: str) -> None:
    """DeepSpeed places the engine on its accelerator, which it picks per process (DS_ACCELERATOR, else CUDA if
    torch sees a GPU). A CPU run on a GPU machine must not land on the GPU, nor a GPU run on the CPU: the
    worker's device decides. A no-op when they agree (every CPU run here)."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() == kind:
        return
    if kind == "cuda":
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

        set_accelerator(CUDA_Accelerator())
    else:
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())


def param_groups(model: nn.Module, own_lr: dict[str, float]) -> list[dict[str, Any]]:
    """Trainable parameters in AdamW groups: those under a module prefix in `own_lr` at that peak LR,
    the rest in the first group (at the optimizer's default, train.lr)."""
    groups: dict[str, list[nn.Parameter]] = {"": [], **{prefix: [] for prefix in own_lr}}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[next((pre for pre in own_lr if name.startswith(pre + ".")), "")].append(p)
    return [{"params": groups[""]}, *({"params": groups[pre], "lr": lr} for pre, lr in own_lr.items() if groups[pre])]


def make_engine(model: nn.Module, train: TrainSection, own_lr: dict[str, float] | None = None,
                device: torch.device | None = None) -> tuple[Any, torch.optim.Optimizer]:
    """Wrap `model` in a DeepSpeed engine on the process group Ray Train already set up (gloo on CPU, NCCL on
    GPUs) and on this worker's `device` (ray.train.torch.get_device(); None: cpu).

    own_lr: module prefix -> peak LR for parameters that learn at another rate than train.lr (the
    router); the warm-up + cosine schedule scales every group alike."""
    device = device or torch.device("cpu")
    _skip_shm_comm_build()
    import deepspeed

    gpu = device.type == "cuda"
    _match_accelerator(device.type)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    ds_config = deepspeed_config(train, device.type)
    groups = param_groups(model.to(device), own_lr or {})

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, train.warmup_steps,
                                                                                      train.steps))

    # DeepSpeed puts the engine on GPU LOCAL_RANK unless told otherwise; Ray Train's device for this worker is
    # the GPU Ray assigned it, which need not be the local rank's index.
    args = SimpleNamespace(device_rank=device.index or 0) if gpu else None
    if "optimizer" in ds_config:   # GPU + offload: DeepSpeedCPUAdam from the config, over our param groups
        engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=groups,
                                                       lr_scheduler=schedule, config=ds_config)
        return engine, optimizer
    # fused=True on GPU: one kernel for all parameters instead of a few per tensor; on CPU today's AdamW.
    optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, fused=gpu or None)
    engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, optimizer=optimizer,
                                                   lr_scheduler=schedule(optimizer), config=ds_config)
    return engine, optimizer


def close_engine(engine: Any) -> None:
    """Without destroy + gc + barrier, ZeRO-3 processes abort at exit in ~10-25% of runs."""
    engine.destroy()
    del engine
    gc.collect()
    if dist.is_initialized():
        dist.barrier()


def full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights on every rank (gathers ZeRO-3 partitions; a no-op copy otherwise)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().clone().cpu() for k, v in module.state_dict().items()}
    return {k: v.detach().float().clone().cpu() for k, v in module.state_dict().items()}
