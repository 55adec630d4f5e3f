"""DeepSpeed on Ray Train workers: the config built from TrainSection, and engine setup/teardown."""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import TrainSection

TRAIN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


SUB_GROUP = 100_000_000   # elements the ZeRO-3 optimizer steps at once (DeepSpeed's default: 1e9)


def zero3_buckets(hidden_size: int) -> dict[str, Any]:
    """ZeRO-3's buffers sized from the model width (the sizes Hugging Face's integration derives for "auto"), so
    their memory grows with the model instead of DeepSpeed's fixed defaults (a 5e8-element reduce bucket: 2 GB in
    fp32, more than the whole model at smoke size). Parameters are released after each use (reuse distance 0): a
    layer's weights are gathered for its forward and again for its backward, the 3x-forward traffic `plan`
    counts. At most SUB_GROUP parameters are gathered at once (measured at 2 layers of 7B width, fp32, 2 workers:
    with DeepSpeed's default 1e9, every forward after the first held 2.1 GB more per worker; with 1e8, 0.6 GB),
    and the optimizer steps its partition in sub-groups of SUB_GROUP elements, so AdamW's temporaries (its
    denominator: one fp32 tensor the size of what it steps) stay 0.4 GB instead of the whole partition."""
    h2 = hidden_size * hidden_size
    return {"reduce_bucket_size": h2, "stage3_prefetch_bucket_size": int(0.9 * h2),
            "stage3_param_persistence_threshold": 10 * hidden_size, "stage3_max_reuse_distance": 0,
            "sub_group_size": SUB_GROUP, "stage3_max_live_parameters": SUB_GROUP}


def deepspeed_config(train: TrainSection, device: str = "cpu", hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config for one job on `device` (cpu or cuda; also what `plan` writes for a cluster);
    hidden_size sizes ZeRO-3's buckets (zero3_buckets; None: DeepSpeed's defaults)."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage == 3 and hidden_size:
        zero.update(zero3_buckets(hidden_size))
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


def init_worker(device: torch.device) -> None:
    """This worker's accelerator and the DeepSpeed process group on the one Ray Train set up (gloo on CPU, NCCL on
    GPUs). Before anything is built: a ZeRO-3 model is partitioned as it is constructed (see `building`)."""
    _skip_shm_comm_build()
    import deepspeed

    _match_accelerator(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)   # zero.Init allocates partitions on the current device
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def building(train: TrainSection, device: torch.device, hidden_size: int) -> contextlib.AbstractContextManager[Any]:
    """The context to construct the trained model in. ZeRO-3: `deepspeed.zero.Init`, so every parameter is
    partitioned over the workers, in the training dtype, as soon as its module is built; no worker ever holds the
    whole model (27 GB in fp32 at 7B). Weights are then streamed in per tensor (pipeline.models.weights), and a
    decoder that no file fills is initialised by `init_fresh_decoder`. ZeRO 0-2: nothing (today's whole build).

    RoPE's inverse frequencies are built with torch.arange, which zero.Init would cast to bf16; transformers'
    own guard keeps them fp32, as from_pretrained does."""
    if train.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    stack = contextlib.ExitStack()
    stack.enter_context(prevent_arange_dtype_change())   # must be entered before zero.Init
    # The dtype comes from the config's bf16/fp16 sections (fp32 when neither is on). Not dtype=: DeepSpeed 0.19.8
    # reads `dtype or fp16 if fp16 is supported else bf16 ...`, so on a CPU it built fp32 runs in bf16.
    stack.enter_context(deepspeed.zero.Init(config_dict_or_path=deepspeed_config(train, device.type, hidden_size)))
    return stack


def init_fresh_decoder(decoder: nn.Module) -> None:
    """A from-scratch decoder built under zero.Init: Hugging Face's weight init ran on empty partitions (a no-op),
    so run it again the way from_config does under ZeRO-3, each module's parameters gathered in turn and
    initialised on rank 0. Not needed, and skipped, when a file fills the decoder."""
    from transformers.integrations.deepspeed import initialize_weights_zero3

    initialize_weights_zero3(decoder)


def make_engine(model: nn.Module, train: TrainSection, own_lr: dict[str, float] | None = None,
                device: torch.device | None = None, hidden_size: int | None = None
                ) -> tuple[Any, torch.optim.Optimizer]:
    """Wrap `model` in a DeepSpeed engine on the process group Ray Train already set up (gloo on CPU, NCCL on
    GPUs) and on this worker's `device` (ray.train.torch.get_device(); None: cpu).

    own_lr: module prefix -> peak LR for parameters that learn at another rate than train.lr (the
    router); the warm-up + cosine schedule scales every group alike. hidden_size: the decoder's width, which sizes
    ZeRO-3's buffers (the same value `building` was given)."""
    device = device or torch.device("cpu")
    init_worker(device)
    import deepspeed

    gpu = device.type == "cuda"
    ds_config = deepspeed_config(train, device.type, hidden_size)
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


def full_state_dict(engine: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The weights under `prefix` (names without it), consolidated, in the parameters' own dtype (bf16 or fp16
    when training in 16 bits; the fp32 master copy stays with the optimizer): what a policy checkpoint holds.

    ZeRO-3: a collective every rank calls, gathering one module's parameters at a time; only rank 0 keeps a
    copy, in host RAM, and the other ranks return {}. So the export never holds more than one module whole on
    any GPU, and the whole model only once, on rank 0's host. ZeRO 0-2: every rank has every weight; each
    returns the state."""
    module = engine.module
    wanted = {k: v for k, v in module.state_dict(keep_vars=True).items() if k.startswith(prefix)}
    if engine.zero_optimization_stage() != 3:
        return {k.removeprefix(prefix): v.detach().clone().cpu() for k, v in wanted.items()}
    import deepspeed

    keep = not dist.is_initialized() or dist.get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    for name, sub in module.named_modules():
        own = [(f"{name}.{p}" if name else p, t) for p, t in sub.named_parameters(recurse=False)]
        own = [(k, t) for k, t in own if k in wanted]
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([t for _, t in own], modifier_rank=None):
            if keep:
                state.update({k: t.detach().to("cpu", copy=True) for k, t in own})
    if not keep:
        return {}
    # Persistent buffers are never partitioned: copied as they are.
    return {k.removeprefix(prefix): state[k] if k in state else v.detach().clone().cpu() for k, v in wanted.items()}
