"""`actdistill plan`: parameters, FLOPs and per-GPU memory of a job on a GPU cluster, sized on the meta device.

Nothing is allocated for the model: the VLA, its router and the probes are built on the meta device,
model-state memory follows ZeRO's accounting (checked against DeepSpeed's own estimators), and
activations are the bytes autograd saves per token (counted for the decoder layer, measured on the
meta device for the probes). The verdict says which ZeRO stage (and offload) fits, and the DeepSpeed
config the job would run with is written next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pipeline.config import ConfigError, ModelSection, PipelineConfig, TrainSection, load_config
from pipeline.data.manifest import Stats
from pipeline.evaluate.flops import policy_flops
from pipeline.models.graph import LayerProbe, ProbeSet
from pipeline.models.student import DistillModule
from pipeline.models.variants import VLM_VARIANTS, size_on_meta, variant, vlm_variant_config
from pipeline.models.vla import VLA, VLAConfig, teacher_config
from pipeline.sim.metaworld_env import ACTION_DIM, PROPRIO_DIM
from pipeline.train.engine import SUB_GROUP

GIB = float(2**30)
Job = Literal["distill", "train-teacher"]
TeacherMode = Literal["cached", "online"]


@dataclass(frozen=True)
class Cluster:
    """A GPU cluster shape: identical GPUs spread evenly over nodes."""

    gpus: int
    gpu_memory_gib: float
    gpus_per_node: int
    cpu_memory_gib: float | None = None  # per node; None: CPU offload is not considered
    headroom: float = 0.10               # CUDA context, cuBLAS workspaces, allocator fragmentation

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node

    @property
    def usable(self) -> float:
        """Bytes per GPU the plan may fill."""
        return self.gpu_memory_gib * GIB * (1.0 - self.headroom)


def make_cluster(gpus: int, gpu_memory_gib: float, gpus_per_node: int | None = None,
                 cpu_memory_gib: float | None = None, headroom: float = 0.10) -> Cluster:
    """A validated cluster shape; every problem is reported at once. Nodes default to the largest
    divisor of the GPU count up to 8 GPUs (the usual GPU server)."""
    fitting = max((d for d in range(1, min(gpus, 8) + 1) if gpus % d == 0), default=1)
    per_node = gpus_per_node or fitting
    problems = []
    if gpus < 1:
        problems.append(f"--gpus={gpus}: at least 1, e.g. --gpus 8")
    if gpu_memory_gib <= 0:
        problems.append(f"--gpu-memory-gib={gpu_memory_gib}: the memory of one GPU, e.g. 80")
    if per_node < 1 or (gpus >= 1 and gpus % per_node):
        problems.append(f"--gpus-per-node={per_node}: must divide --gpus={gpus}, e.g. {fitting}")
    if cpu_memory_gib is not None and cpu_memory_gib <= 0:
        problems.append(f"--cpu-memory-gib={cpu_memory_gib}: RAM of one node, e.g. 1024, or leave it out")
    if not 0 <= headroom < 1:
        problems.append(f"--headroom={headroom}: a fraction of GPU memory kept free in [0, 1), e.g. 0.1")
    if problems:
        raise ValueError("cluster: " + "; ".join(problems))
    return Cluster(gpus, gpu_memory_gib, per_node, cpu_memory_gib, headroom)


# ---------------------------------------------------------------- the model, on the meta device

def plan_vla_config(cfg: PipelineConfig, variant_name: str | None, image_size: int | None = None,
                    proprio_dim: int = PROPRIO_DIM, action_dim: int = ACTION_DIM) -> VLAConfig:
    """The teacher: the model section (or a named variant's decoder, or a whole VLM variant at its own image size)
    with the config's input sizes."""
    if variant_name in VLM_VARIANTS:
        vla = vlm_variant_config(variant_name, cfg.model.max_instruction_tokens, proprio_dim, action_dim)
        if image_size not in (None, vla.image_size):
            raise ValueError(f"--image-size={image_size}: {variant_name} takes {vla.image_size} px frames (its "
                             f"processor's size); leave --image-size out")
        return vla
    size = image_size or cfg.collect.image_size
    vla = teacher_config(cfg.model, [size, size], proprio_dim, action_dim, _sizing_stats(action_dim))
    if variant_name is None:
        return vla
    return vla.model_copy(update=variant(variant_name))


def _sizing_stats(action_dim: int) -> Stats:
    """Action statistics for sizing without data: a tokens head's bins' range changes none of its sizes."""
    return Stats(mean=[0.0] * action_dim, std=[1.0] * action_dim, q01=[-1.0] * action_dim, q99=[1.0] * action_dim)


def _count(module: nn.Module, trainable: bool | None = None) -> float:
    """Parameters of `module`; trainable True/False: only those the optimizer updates / only frozen ones."""
    return float(sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable))


def _probes(vla: VLAConfig, model: ModelSection) -> ProbeSet:
    # The same widths as pipeline.teacher.probing.new_probes (which imports Ray).
    return ProbeSet(vla.num_layers, vla.hidden_size, model.graph_width, model.semantic_dim, model.top_k,
                    model.graph_heads, vla.action_dim)


def largest_layer_params(module: nn.Module) -> int:
    """DeepSpeed's "largest layer" (the most parameters held directly by one module).

    DeepSpeed's own `model_to_params` also sums the total by `data_ptr()`, which is 0 for every tensor
    on the meta device (it reports 32 parameters for the 7B VLA); only its per-module part is reused.
    """
    from deepspeed.runtime.zero.stage3 import model_to_params

    return int(model_to_params(module)[1])


@dataclass(frozen=True)
class Params:
    teacher: float
    decoder: float
    router: float
    probes: float
    trained: float          # what the optimizer updates: student + probes (distill) or the teacher
    frozen: float           # frozen copies held by an online-teacher distillation: teacher + its probes
    held: float             # frozen parts of the trained model (a VLM's vision tower + projector): weights only
    largest_layer: int
    # The teacher's parts (decoder above): a VLM's vision tower (our stem otherwise) and projector; proprio + head.
    vision_tower: float = 0.0
    projector: float = 0.0
    head: float = 0.0


def count_params(vla: VLAConfig, model: ModelSection, router_hidden: int, job: Job) -> Params:
    """Parameter counts from modules built on the meta device (no memory)."""
    student_cfg = vla.model_copy(update={"router_hidden": router_hidden})
    sized = size_on_meta(student_cfg)
    teacher = sized["params_total"] - sized["params_router"]
    with torch.device("meta"):
        probes = _probes(vla, model)
        trained_module: nn.Module = DistillModule(VLA(student_cfg), probes) if job == "distill" else VLA(vla)
    probe_count = _count(probes)
    return Params(teacher=teacher, decoder=sized["params_backbone"], router=sized["params_router"],
                  probes=probe_count, trained=_count(trained_module, True), frozen=teacher + probe_count,
                  held=_count(trained_module, False),
                  largest_layer=largest_layer_params(trained_module), vision_tower=sized["params_vision_tower"],
                  projector=sized["params_projector"], head=sized["params_head"])


# ---------------------------------------------------------------- FLOPs per sample

def probe_flops(vla: VLAConfig, model: ModelSection) -> float:
    """Forward FLOPs of the L training-only probes for one sample (matrix products, as flops.py counts)."""
    n, d, w, h = vla.seq_len, vla.hidden_size, model.graph_width, model.graph_heads
    k, s, a = min(model.top_k, vla.seq_len), model.semantic_dim, vla.action_dim
    graph = 2 * n * d * w + 2 * 2 * n * w * w + 2 * n * n * w   # input projection, phi and psi, all-pairs affinity
    gat = 2 * n * w * w * (2 + h) + 2 * n * k * w * (1 + h)      # q, k, v (h*w wide); scores, messages over k
    readout = 2 * 2 * n * w + 2 * (w * w + w * s) + 2 * (s * s + s * a)
    return float(vla.num_layers * (graph + 2 * gat + readout))


def flops_per_sample(vla: VLAConfig, model: ModelSection, router_hidden: int, budget: float, job: Job
                     ) -> dict[str, float]:
    """Forward FLOPs per sample, and a training step's: backward costs ~2x forward, so a step ~3x."""
    layers = float(vla.num_layers)
    student = policy_flops(vla, layers, router_hidden)["total"]
    teacher = policy_flops(vla, layers)
    out = {"teacher_forward": teacher["total"], "student_forward": student,
           "student_at_budget": policy_flops(vla, budget * layers, router_hidden)["total"],
           "probes_forward": probe_flops(vla, model)}
    out.update({f"teacher_{part}": teacher[part] for part in ("vision_tower", "projector", "backbone", "action_head")})
    if job == "distill":
        # Training gates are soft or straight-through: every layer runs, so the student costs all L layers.
        out["train_step"] = 3.0 * (student + out["probes_forward"])
        out["online_teacher"] = out["teacher_forward"] + out["probes_forward"]   # no backward: frozen
    else:
        out["train_step"] = 3.0 * out["teacher_forward"]
    return out


# ---------------------------------------------------------------- activations

def decoder_layer_bytes_per_token(vla: VLAConfig, gated: bool) -> float:
    """Bytes autograd keeps per token for one bf16 decoder layer (no recomputation), as counted from
    transformers' Llama/Qwen2/Mistral layer with fused SDPA (checked in tests/test_plan.py):
    two RMSNorms keep an fp32 copy (4d), fp32 rstd (4), the bf16 normalised input (2d) and its scaled
    copy (2d): 16d + 8; attention keeps q, k, v (k, v repeated to full width when a padding mask is
    passed), its output (8d) and an fp32 log-sum-exp per head (4 heads); the gated MLP keeps gate, up,
    act(gate) and their product (8f); each layer saves the B x N x N attention mask (2 N); the gate on the
    residual update keeps the update (2d)."""
    d, f = vla.hidden_size, vla.intermediate_size
    return 24 * d + 8 * f + 4 * vla.num_heads + 8 + 2 * vla.seq_len + (2 * d if gated else 0)


def _saved_bytes(run: Callable[[], object], exclude: set[int]) -> float:
    """Bytes of the distinct storages autograd saves while `run()` executes, skipping `exclude`."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # _cdata identifies the storage; data_ptr() is 0 for every meta tensor.
        key = t.untyped_storage()._cdata
        if key not in exclude and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return float(sum(seen.values()))


def probe_bytes_per_sample(vla: VLAConfig, model: ModelSection) -> float:
    """Bytes one bf16 probe keeps for backward per sample, measured on the meta device (the probes are
    plain torch ops, so meta saves what a GPU saves); includes the recorded hidden state it reads."""
    with torch.device("meta"):
        probe = LayerProbe(vla.hidden_size, model.graph_width, model.semantic_dim, model.top_k,
                           model.graph_heads, vla.action_dim).to(torch.bfloat16)
        hidden = torch.empty(1, vla.seq_len, vla.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        mask = torch.ones(1, vla.seq_len, dtype=torch.long)
    params = {p.untyped_storage()._cdata for p in probe.parameters()}
    return _saved_bytes(lambda: probe(hidden, mask), params)


def activation_bytes_per_sample(vla: VLAConfig, model: ModelSection, job: Job) -> dict[str, float]:
    """Decoder layers and (distilling) probes; embeddings, router and heads add <1% at 7B width."""
    gated = job == "distill"
    decoder = vla.num_layers * vla.seq_len * decoder_layer_bytes_per_token(vla, gated)
    probes = vla.num_layers * probe_bytes_per_sample(vla, model) if gated else 0.0
    return {"decoder": decoder, "probes": probes, "total": decoder + probes}


# ---------------------------------------------------------------- model states under ZeRO

@dataclass(frozen=True)
class Option:
    name: str
    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False


# In order of preference: less sharding communication first (ZeRO-3 gathers weights in forward and
# backward: 1.5x ZeRO-2's traffic), CPU offload last (the AdamW step then runs on the CPU).
OPTIONS = (Option("ZeRO-2", 2), Option("ZeRO-3", 3), Option("ZeRO-2+opt", 2, True),
           Option("ZeRO-3+opt", 3, True), Option("ZeRO-3+all", 3, True, True))


@dataclass(frozen=True)
class StateMemory:
    """Per-GPU bytes of bf16 model states with AdamW under one option, and DeepSpeed's estimate."""

    weights: float
    gradients: float
    master: float            # fp32 master weights
    fp32_grads: float        # the fp32 gradient partition AdamW reads: only inside the optimizer step
    adam: float              # AdamW m and v, fp32
    buffers: float           # ZeRO communication buckets (and ZeRO-3's gathered layer)
    frozen: float            # an online teacher + its probes, bf16, no optimizer state
    cpu_per_node: float      # what offload moves to host RAM
    deepspeed_gpu: float
    deepspeed_cpu: float

    @property
    def resident(self) -> float:
        """Bytes held through forward and backward."""
        return self.weights + self.gradients + self.master + self.adam + self.buffers + self.frozen

    @property
    def gpu(self) -> float:
        return self.resident + self.fp32_grads

    @property
    def host(self) -> float:
        """Host RAM per node offload needs: DeepSpeed's estimate (1.5x buffer factor) unless ours is larger
        (it leaves out an online teacher offloaded with the parameters)."""
        return max(self.cpu_per_node, self.deepspeed_cpu)


def zero_buffers(option: Option, ds_config: dict[str, Any], largest_layer: int) -> float:
    """Buffer bytes from DeepSpeed's own defaults for the stage (bf16: 2 bytes per element)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig(**ds_config["zero_optimization"])
    reduce_bucket = 2.0 * zero.reduce_bucket_size            # 5e8 elements by default: 0.93 GiB
    if option.stage == 2:
        return reduce_bucket * (2 if zero.overlap_comm else 1)   # a second bucket when comm overlaps
    # ZeRO-3: the gathered largest layer and its gradient (DeepSpeed's 4 bytes x largest layer),
    # the prefetch bucket and the reduce bucket.
    return 4.0 * largest_layer + 2.0 * zero.prefetch_bucket_size + reduce_bucket


def deepspeed_estimate(option: Option, params: Params, cluster: Cluster) -> tuple[float, float]:
    """(GPU, CPU-per-node) bytes from DeepSpeed's estimators, called with counts (the `_all_live`
    variants read counts from a model and miscount on the meta device)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = dict(num_gpus_per_node=cluster.gpus_per_node, num_nodes=cluster.nodes)
    if option.stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(int(params.trained), cpu_offload=option.offload_optimizer,
                                                         **shape)
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            int(params.trained), params.largest_layer, cpu_offload=option.offload_optimizer,
            cpu_offload_params=option.offload_params, zero_init=True, **shape)
    return float(gpu), float(cpu)


def state_memory(option: Option, params: Params, cluster: Cluster, ds_config: dict[str, Any],
                 online: bool) -> StateMemory:
    """ZeRO's accounting of bf16 mixed precision: 2 bytes of weights, 2 of gradients, 4 + 4 of fp32
    master weights and gradient partition, 8 of AdamW moments per parameter; ZeRO-2 shards all but the
    weights over the GPUs, ZeRO-3 shards the weights too; offload moves the fp32 part (and with
    parameter offload the weights) to host RAM."""
    p, n = params.trained, cluster.gpus
    shards = n if option.stage == 3 else 1
    frozen = 2 * params.frozen if online else 0.0
    weights = 0.0 if option.offload_params else 2 * (p + params.held) / shards
    gradients = 0.0 if option.offload_optimizer else 2 * p / n   # offload copies reduced grads to the host
    fp32 = 0.0 if option.offload_optimizer else 4 * p / n
    host = (16 * p if option.offload_optimizer else 0.0) + ((2 * (p + params.held) + frozen)
                                                            if option.offload_params else 0.0)
    ds_gpu, ds_cpu = deepspeed_estimate(option, params, cluster)
    return StateMemory(weights=weights, gradients=gradients, master=fp32, fp32_grads=fp32, adam=2 * fp32,
                       buffers=zero_buffers(option, ds_config, params.largest_layer),
                       frozen=0.0 if option.offload_params else frozen / shards,
                       cpu_per_node=host / cluster.nodes, deepspeed_gpu=ds_gpu, deepspeed_cpu=ds_cpu)


# ---------------------------------------------------------------- fitting

@dataclass(frozen=True)
class Fit:
    option: Option
    states: StateMemory
    activations: float      # at the configured micro-batch
    max_micro_batch: int    # the largest micro-batch that fits; 0: none
    host: float             # host RAM per node (host_per_node)
    host_ok: bool           # the node's RAM (--cpu-memory-gib) holds `host`; offload needs it stated

    @property
    def total(self) -> float:
        """Peak: the fp32 gradient partition exists only in the optimizer step, after backward freed
        the activations, so the two never coexist."""
        return self.states.resident + max(self.states.fp32_grads, self.activations)


def _micro_batch_for(samples: int, limit: int) -> int:
    """The largest divisor of the samples per GPU and step not above `limit`: keeps the global batch."""
    return max((b for b in range(1, samples + 1) if samples % b == 0 and b <= limit), default=0)


# Host RAM of one GPU worker process besides what offload puts there: a CPU worker's 0.7 GiB (WORKER_BASELINE)
# plus the CUDA context and kernels' host side (~1.5 GiB). An estimate: no GPU worker was measured here yet.
GPU_WORKER_HOST = 2.2 * GIB


def host_per_node(option: Option, states: StateMemory, cluster: Cluster, exported: float) -> float:
    """Host RAM one node needs: its worker processes, what offload moves there, and (rank 0's node) the student
    consolidated in bf16 at each checkpoint (`exported` parameters). Weights are streamed from memory-mapped
    checkpoint files: page cache, which the kernel reclaims, not counted; no worker builds the model whole."""
    offloaded = states.host if option.offload_optimizer else 0.0
    return cluster.gpus_per_node * GPU_WORKER_HOST + offloaded + 2 * exported


def fit_option(option: Option, params: Params, cluster: Cluster, train: TrainSection, ds_config: dict[str, Any],
               per_sample: float, online: bool, exported: float) -> Fit:
    states = state_memory(option, params, cluster, ds_config, online)
    room = cluster.usable - states.resident
    host = host_per_node(option, states, cluster, exported)
    if cluster.cpu_memory_gib is None:
        host_ok = not option.offload_optimizer   # offload is considered only with the nodes' RAM stated
    else:
        host_ok = host <= cluster.cpu_memory_gib * GIB
    limit = int(room // per_sample) if room > 0 and host_ok and states.gpu <= cluster.usable else 0
    samples = train.batch_size * train.grad_accum
    return Fit(option=option, states=states, activations=per_sample * train.batch_size,
               max_micro_batch=_micro_batch_for(samples, min(limit, train.batch_size)), host=host, host_ok=host_ok)


def choose(fits: list[Fit]) -> Fit | None:
    """The first option (in OPTIONS order) that runs at least half the largest micro-batch any option
    allows: halving the micro-batch doubles accumulation steps but keeps the optimisation the same,
    while each step down the list adds communication or a CPU-side optimizer (x1.5 traffic for ZeRO-3,
    PCIe transfers for offload)."""
    best = max((f.max_micro_batch for f in fits), default=0)
    return next((f for f in fits if best and 2 * f.max_micro_batch >= best), None)


def min_gpus_zero3(params: Params, cluster: Cluster, ds_config: dict[str, Any], per_sample: float) -> int | None:
    """GPUs of this size ZeRO-3 would need at micro-batch 1 without offload (20 bytes per parameter
    sharded, as `state_memory` counts); None if no count helps."""
    room = cluster.usable - zero_buffers(OPTIONS[1], ds_config, params.largest_layer) - per_sample
    return math.ceil(20 * params.trained / room) if room > 0 else None


# ---------------------------------------------------------------- the DeepSpeed config

def planned_deepspeed_config(train: TrainSection, option: Option, micro_batch: int,
                             hidden_size: int | None = None) -> dict[str, Any]:
    """`deepspeed_config` of the job's train section with the chosen stage, bf16 and offload."""
    from pipeline.train.engine import deepspeed_config

    samples = train.batch_size * train.grad_accum
    planned = train.model_copy(update={"zero_stage": option.stage, "precision": "bf16", "batch_size": micro_batch,
                                       "grad_accum": samples // micro_batch, "offload": _offload_key(option)})
    return deepspeed_config(planned, "cuda", hidden_size)


def _offload_key(option: Option) -> str:
    """The train.offload value that makes deepspeed_config offload what this option offloads."""
    return "all" if option.offload_params else "optimizer" if option.offload_optimizer else "none"


def check_deepspeed_config(ds: dict[str, Any]) -> None:
    """Parse with DeepSpeed's own config class: the plan never writes a config DeepSpeed refuses."""
    from deepspeed.runtime.config import DeepSpeedConfig

    DeepSpeedConfig(json.loads(json.dumps(ds)))


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Plan:
    job: Job
    teacher_mode: TeacherMode
    model_name: str
    vla: VLAConfig
    graph_width: int
    cluster: Cluster
    train: TrainSection
    params: Params
    flops: dict[str, float]
    activations: dict[str, float]     # bytes per sample: decoder, probes, total
    fits: dict[str, list[Fit]]        # "cached" / "online" -> one Fit per option
    choice: Fit | None                # for the config's teacher mode
    deepspeed: dict[str, Any] | None
    min_gpus: int | None

    @property
    def fits_cluster(self) -> bool:
        return self.choice is not None


def _modes(job: Job) -> list[TeacherMode]:
    return ["cached", "online"] if job == "distill" else ["cached"]


def make_plan(cfg: PipelineConfig, cluster: Cluster, variant_name: str | None = None, job: Job = "distill",
              image_size: int | None = None, proprio_dim: int = PROPRIO_DIM, action_dim: int = ACTION_DIM) -> Plan:
    """Everything `actdistill plan` prints, computed on the meta device in seconds."""
    vla = plan_vla_config(cfg, variant_name, image_size, proprio_dim, action_dim)
    train = cfg.distill.train if job == "distill" else cfg.teacher
    params = count_params(vla, cfg.model, cfg.router.hidden, job)
    activations = activation_bytes_per_sample(vla, cfg.model, job)
    per_sample = activations["total"]
    # An online teacher runs under no_grad before the student and its hidden states are freed once its
    # probes have read them: it adds its weights, not activations, to the peak.
    exported = params.teacher + (params.router if job == "distill" else 0.0)
    h = vla.hidden_size
    fits = {mode: [fit_option(o, params, cluster, train, planned_deepspeed_config(train, o, train.batch_size, h),
                              per_sample, mode == "online", exported) for o in OPTIONS] for mode in _modes(job)}
    mode: TeacherMode = cfg.distill.teacher_mode if job == "distill" else "cached"
    choice = choose(fits[mode])
    ds = None
    if choice is not None:
        ds = planned_deepspeed_config(train, choice.option, choice.max_micro_batch, h)
        check_deepspeed_config(ds)
    return Plan(job=job, teacher_mode=mode, model_name=variant_name or f"model section ({vla.backbone})",
                vla=vla, graph_width=cfg.model.graph_width, cluster=cluster, train=train, params=params,
                flops=flops_per_sample(vla, cfg.model, cfg.router.hidden, cfg.router.budget, job),
                activations=activations, fits=fits, choice=choice, deepspeed=ds,
                min_gpus=min_gpus_zero3(params, cluster, planned_deepspeed_config(train, OPTIONS[1], 1, h),
                                        per_sample))


# ---------------------------------------------------------------- CPU workers: host memory per process

# Resident memory of one Ray Train worker before its model is built: Python, torch, DeepSpeed, transformers, Ray and
# Ray Data imported, the gloo group up, a tiny model training. Measured as the peak RSS of a smoke-size distill
# worker (a 2 x 32 decoder under ZeRO-3: its model states are ~1 MB) on this stack: 0.66 and 0.71 GiB (2 workers).
WORKER_BASELINE = 0.7 * GIB
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class CpuPlan:
    """Host bytes of one training worker that computes on the CPU (every byte of its model states is host
    memory), per term; rank 0 also holds the consolidated export at each checkpoint."""

    params: Params
    tokens: int                   # per sample
    breakdown: dict[str, float]   # every rank
    export: float                 # rank 0 only, at a checkpoint: the student consolidated in the training dtype
    flops_per_step: float         # per worker: its micro-batches' forward + backward (+ the online teacher)

    @property
    def other(self) -> float:
        return sum(self.breakdown.values())

    @property
    def rank0(self) -> float:
        return self.other + self.export


def cpu_worker_bytes(params: Params, train: TrainSection, online: bool, activations_per_sample: float,
                     student: float, hidden_size: int) -> tuple[dict[str, float], float]:
    """(per-worker terms, rank 0's export) in bytes. ZeRO-3 shards weights, gradients and AdamW state over the
    workers; ZeRO-1/2 shard the optimizer state (2: gradients too); ZeRO-0 shards nothing. In fp32 DeepSpeed
    updates the weights in place (no separate master copy); in 16 bits it keeps an fp32 master partition."""
    n, stage, w = train.num_workers, train.zero_stage, _ITEMSIZE[train.precision]
    p = params.trained
    weights_shards = n if stage == 3 else 1
    terms = {"baseline": WORKER_BASELINE,
             "weights": w * (p + params.held) / weights_shards,
             "master": 0.0 if w == 4 else 4 * p / (n if stage else 1),
             "gradients": w * p / (n if stage >= 2 else 1),
             "adam": 8 * p / (n if stage else 1),
             "frozen teacher": w * params.frozen / weights_shards if online else 0.0,
             "activations": activations_per_sample * train.batch_size * w / 2}
    if stage == 3:
        sub = min(float(SUB_GROUP), p / n)
        # DeepSpeed's own: the gradient buffer the optimizer's init leaves on each sub-group (one sub-group of
        # fp32), and the reduce and prefetch buckets (h^2 and 0.9 h^2 elements, engine.zero3_buckets).
        terms["optimizer buffers"] = 4 * sub + w * 1.9 * hidden_size**2
        # In forward and backward: the parameters gathered at once (stage3_max_live_parameters = SUB_GROUP) and the
        # largest layer's whole gradient before its reduce-scatter; in the optimizer step, AdamW's temporaries over
        # one sub-group instead (no larger).
        terms["gathered in flight"] = w * (SUB_GROUP + params.largest_layer)
    return terms, w * student


def cpu_plan(cfg: PipelineConfig, image_shape: tuple[int, int, int], proprio_dim: int, action_dim: int) -> CpuPlan:
    """`plan --device cpu` for the distill job of `cfg`: host memory per worker and FLOPs per optimizer step."""
    vla = teacher_config(cfg.model, list(image_shape), proprio_dim, action_dim, _sizing_stats(action_dim))
    train = cfg.distill.train
    params = count_params(vla, cfg.model, cfg.router.hidden, "distill")
    # activation_bytes_per_sample counts bf16 activations (cpu_worker_bytes scales them to the training dtype).
    per_sample = activation_bytes_per_sample(vla, cfg.model, "distill")["total"]
    online = cfg.distill.teacher_mode == "online"
    terms, export = cpu_worker_bytes(params, train, online, per_sample, params.teacher + params.router,
                                     vla.hidden_size)
    flops = flops_per_sample(vla, cfg.model, cfg.router.hidden, cfg.router.budget, "distill")
    step = flops["train_step"] + (flops["online_teacher"] if online else 0.0)
    return CpuPlan(params=params, tokens=vla.seq_len, breakdown=terms, export=export,
                   flops_per_step=step * train.batch_size * train.grad_accum)


def matmul_flops_per_s(size: int = 1024, repeats: int = 8) -> float:
    """This machine's fp32 matrix-product rate on one thread (a CPU training worker runs one): the best of
    `repeats` size x size products."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 2.0 * size**3 / best


# ---------------------------------------------------------------- rendering

def _m(x: float) -> str:
    return f"{x / 1e6:,.1f} M"


def _t(x: float) -> str:
    return f"{x / 1e12:,.3f} TFLOPs"


def _g(x: float) -> str:
    return f"{x / GIB:7.1f}"


def _rows(title: str, rows: list[tuple[str, str, str]]) -> list[str]:
    return [title] + [f"  {label:34}{value:>16}  {note}".rstrip() for label, value, note in rows]


def _render_params(plan: Plan) -> list[str]:
    p, v = plan.params, plan.vla
    tower = "vision tower" if plan.vla.vlm is not None else "vision stem"
    rows = [("teacher VLA", _m(p.teacher), f"({tower} {_m(p.vision_tower)}, projector {_m(p.projector)}, "
                                           f"decoder {_m(p.decoder)}, proprio + action head {_m(p.head)})")]
    if plan.job == "distill":
        rows += [("student = teacher + router", _m(p.teacher + p.router), f"(router {_m(p.router)})"),
                 ("probes, training only", _m(p.probes), f"({v.num_layers} layers x graph width {plan.graph_width})")]
    rows.append(("trained by this job", _m(p.trained), f"(largest layer {_m(p.largest_layer)})"))
    if p.held:
        rows.append(("frozen in the trained model", _m(p.held), "(vision tower + projector: weights only, "
                                                                 "model.train_vision=false)"))
    return _rows("parameters", rows)


def _render_flops(plan: Plan, global_batch: int) -> list[str]:
    f, layers = plan.flops, plan.vla.num_layers
    tower = "vision tower" if plan.vla.vlm is not None else "vision stem"
    rows = [("teacher forward", _t(f["teacher_forward"]),
             f"({tower} {_t(f['teacher_vision_tower'])}, projector {_t(f['teacher_projector'])}, "
             f"decoder {_t(f['teacher_backbone'])}, head {_t(f['teacher_action_head'])})")]
    if plan.job == "distill":
        rows += [(f"student forward, {layers} layers", _t(f["student_forward"]), "(training runs every layer)"),
                 ("student at the router budget", _t(f["student_at_budget"]), "(inference, expected)"),
                 ("probes forward", _t(f["probes_forward"]), ""),
                 ("distill step (student + probes)", _t(f["train_step"]), ""),
                 ("+ online teacher forward", _t(f["online_teacher"]), "(teacher_mode=online only)")]
    else:
        rows.append(("train-teacher step", _t(f["train_step"]), ""))
    rows.append((f"per optimizer step ({global_batch} samples)", f"{f['train_step'] * global_batch / 1e15:,.2f} PFLOPs",
                 ""))
    return _rows("FLOPs per sample (multiply-add = 2; a training step = 3 x forward: backward ~2 x forward)", rows)


_ROWS = (("weights (bf16)", lambda f: f.states.weights), ("gradients (bf16)", lambda f: f.states.gradients),
         ("fp32 master weights", lambda f: f.states.master), ("AdamW m, v (fp32)", lambda f: f.states.adam),
         ("fp32 grads (in step)", lambda f: f.states.fp32_grads),
         ("ZeRO buffers", lambda f: f.states.buffers), ("model states", lambda f: f.states.gpu),
         ("  DeepSpeed estimator", lambda f: f.states.deepspeed_gpu), ("activations", lambda f: f.activations),
         ("peak", lambda f: f.total))


def _render_memory(plan: Plan, mode: TeacherMode) -> list[str]:
    fits, c = plan.fits[mode], plan.cluster
    title = {"cached": "cached labels (teacher targets read from labelled shards)",
             "online": "online teacher (frozen teacher + probes in bf16 beside the student)"}[mode]
    title = title if plan.job == "distill" else "the teacher alone"
    lines = [f"per-GPU memory, GiB: {title}",
             f"  {'':22}" + "".join(f"{f.option.name:>12}" for f in fits)]
    rows = list(_ROWS)
    if mode == "online":
        rows.insert([r[0] for r in rows].index("model states"), ("frozen teacher", lambda f: f.states.frozen))
    lines += [f"  {name:22}" + "".join(f"{_g(get(f)):>12}" for f in fits) for name, get in rows]
    lines.append(f"  {'host RAM per node':22}" + "".join(f"{_g(f.host):>12}" for f in fits))
    lines.append(f"  {'max micro-batch':22}" + "".join(
        f"{(str(f.max_micro_batch) if f.host_ok else 'no RAM'):>12}" for f in fits))
    a, batch = plan.activations, plan.train.batch_size
    lines.append(f"  fits: peak <= {c.usable / GIB:.1f} GiB ({c.gpu_memory_gib:g} GiB less {c.headroom:.0%} headroom); "
                 f"peak = resident + max(activations, fp32 grads)")
    lines.append(f"  activations at micro-batch {batch}: {fits[0].activations / batch / GIB:.3f} GiB/sample "
                 f"(decoder layers {a['decoder'] / GIB:.3f}, probes {a['probes'] / GIB:.3f})")
    return lines


def _render_verdict(plan: Plan, out: Path | None) -> list[str]:
    c, choice = plan.cluster, plan.choice
    mode = f" ({plan.teacher_mode})" if plan.job == "distill" else ""
    if choice is None:
        need = (f"ZeRO-3 without offload needs >= {plan.min_gpus} GPUs of {c.gpu_memory_gib:g} GiB at micro-batch 1"
                if plan.min_gpus else f"no GPU count of {c.gpu_memory_gib:g} GiB holds one sample's activations")
        offload = "" if c.cpu_memory_gib else "; pass --cpu-memory-gib (RAM per node) to consider CPU offload"
        one = plan.activations["total"]
        fits = plan.fits[plan.teacher_mode]
        if c.cpu_memory_gib is not None and not any(f.host_ok for f in fits):
            least = min(fits, key=lambda f: f.host)
            return [f"DOES NOT FIT{mode}: the nodes' RAM: every option needs more host memory per node than "
                    f"--cpu-memory-gib={c.cpu_memory_gib:g}; the least is {least.host / GIB:.1f} GiB "
                    f"({least.option.name}: {c.gpus_per_node} worker processes, the bf16 export on rank 0's node"
                    f"{', offloaded states' if least.option.offload_optimizer else ''});",
                    "  use nodes with more RAM or fewer GPUs per node (--gpus-per-node)"]
        peak, name = min((f.states.resident + max(f.states.fp32_grads, one), f.option.name)
                         for f in fits if f.host_ok)
        return [f"DOES NOT FIT{mode}: even at micro-batch 1 the smallest peak is {peak / GIB:.1f} GiB "
                f"({name}) of {c.usable / GIB:.1f} GiB usable per GPU;",
                f"  {need}{offload}"]
    samples = plan.train.batch_size * plan.train.grad_accum
    micro = choice.max_micro_batch
    section = "distill.train" if plan.job == "distill" else "teacher"
    lines = [f"FITS{mode}: {choice.option.name} at micro-batch {micro} x {samples // micro} "
             f"accumulation steps per GPU ({samples * c.gpus} samples per optimizer step)",
             f"  overrides: {section}.zero_stage={choice.option.stage} {section}.precision=bf16 "
             f"{section}.num_workers={c.gpus} {section}.batch_size={micro} {section}.grad_accum={samples // micro}"
             + (f" {section}.offload={_offload_key(choice.option)}" if choice.option.offload_optimizer else "")]
    if out is not None:
        lines.append(f"  DeepSpeed config: {out}")
    return lines


def _render_other_mode(plan: Plan) -> list[str]:
    """One line for the teacher mode the config does not run, so both can be compared."""
    other = [m for m in _modes(plan.job) if m != plan.teacher_mode]
    if not other:
        return []
    fit = choose(plan.fits[other[0]])
    verdict = f"{fit.option.name} at micro-batch {fit.max_micro_batch}" if fit else "does not fit"
    return [f"  with distill.teacher_mode={other[0]}: {verdict}"]


def _render_tokens(v: VLAConfig) -> str:
    queries = 1 + v.action_queries   # proprio + the action query (a tokens head: one per action dimension)
    if v.vlm is None:
        return (f"tokens per sample: {v.num_patches} patches ({v.image_size}px / {v.patch_size}) + "
                f"{v.max_instruction_tokens} instruction + {queries} = {v.seq_len}")
    return (f"tokens per sample: {v.num_patches} image tokens ({v.vlm.family}, {v.image_size}px / {v.patch_size}) + "
            f"{v.vlm.prompt_tokens} prompt + {v.max_instruction_tokens} instruction + {queries} = {v.seq_len}")


def render(plan: Plan, out: Path | None = None) -> str:
    v, c = plan.vla, plan.cluster
    samples = plan.train.batch_size * plan.train.grad_accum * c.gpus
    head = [f"actdistill plan: {plan.job} of {plan.model_name} ({v.backbone}, {v.num_layers} x {v.hidden_size}) on "
            f"{c.gpus} x {c.gpu_memory_gib:g} GiB GPUs ({c.nodes} node{'s' * (c.nodes > 1)}), bf16",
            _render_tokens(v), ""]
    body = _render_params(plan) + [""] + _render_flops(plan, samples) + [""]
    for mode in _modes(plan.job):
        body += _render_memory(plan, mode) + [""]
    return "\n".join(head + body + _render_verdict(plan, out) + _render_other_mode(plan))


# ---------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actdistill plan", description="Size a job for a GPU cluster (meta device)")
    p.add_argument("--config", help="YAML config, e.g. infra/configs/cluster.yaml (default: built-in defaults)")
    p.add_argument("--variant", help="a named decoder or VLM from pipeline/models/variants.py, e.g. llama2-7b, "
                                     "llava-7b (default: the config's model section)")
    p.add_argument("--job", choices=["distill", "train-teacher"], default="distill")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                   help="gpu (default): size for a GPU cluster; cpu: host memory per CPU training worker of the "
                        "config's distill job (its num_workers, precision and ZeRO stage), as bench/scale.py measures")
    p.add_argument("--gpus", type=int, help="GPUs in the cluster, e.g. 8 (required with --device gpu)")
    p.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU, e.g. 80 (required with --device gpu)")
    p.add_argument("--gpus-per-node", type=int, help="default: the largest divisor of --gpus up to 8")
    p.add_argument("--cpu-memory-gib", type=float, help="RAM per node: plans needing more are refused; CPU offload "
                                                        "is considered only with it")
    p.add_argument("--headroom", type=float, default=0.10, help="GPU memory kept free (default 0.10)")
    p.add_argument("--image-size", type=int, help="default: collect.image_size")
    p.add_argument("--proprio-dim", type=int, default=PROPRIO_DIM)
    p.add_argument("--action-dim", type=int, default=ACTION_DIM)
    p.add_argument("--out", default="deepspeed.json", help="where the DeepSpeed config is written")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as distill.train.batch_size=16")
    return p


def render_cpu(plan: CpuPlan, train: TrainSection, ram_gib: float | None) -> tuple[str, bool]:
    """The CPU plan's text and whether it fits `ram_gib` (None: not checked)."""
    need = train.num_workers * plan.other + plan.export
    lines = [f"actdistill plan --device cpu: distill on {train.num_workers} CPU workers, ZeRO-{train.zero_stage}, "
             f"{train.precision}, micro-batch {train.batch_size}, {plan.tokens} tokens per sample",
             f"parameters: trained {_m(plan.params.trained)}, frozen {_m(plan.params.frozen)}",
             "host memory per worker, GiB:"]
    lines += [f"  {name:22}{_g(value):>10}" for name, value in plan.breakdown.items()]
    lines += [f"  {'worker':22}{_g(plan.other):>10}",
              f"  {'rank 0 (+ export)':22}{_g(plan.rank0):>10}  (the student consolidated at each checkpoint)",
              f"all workers on one machine: {need / GIB:.1f} GiB; FLOPs per worker and step: "
              f"{plan.flops_per_step / 1e12:,.3f} TFLOPs"]
    fits = ram_gib is None or need <= ram_gib * GIB
    if ram_gib is not None:
        lines.append(f"{'FITS' if fits else 'DOES NOT FIT'}: {need / GIB:.1f} of --cpu-memory-gib={ram_gib:g}"
                     + ("" if fits else "; lower num_workers, use ZeRO-3, or a machine with more RAM"))
    return "\n".join(lines), fits


def _main_cpu(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    if args.variant:
        raise ValueError(f"--variant={args.variant} sizes a GPU plan; with --device cpu set the model section "
                         f"instead (e.g. model.hidden_size=4096 model.num_layers=2)")
    size = args.image_size or cfg.collect.image_size
    plan = cpu_plan(cfg, (size, size, 3), args.proprio_dim, args.action_dim)
    text, fits = render_cpu(plan, cfg.distill.train, args.cpu_memory_gib)
    print(text)
    return 0 if fits else 1


def main(argv: list[str]) -> int:
    """Print the plan; write the DeepSpeed config and exit 0 if it fits, exit 1 if it does not."""
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.device == "cpu":
            return _main_cpu(args, cfg)
        if args.gpus is None or args.gpu_memory_gib is None:
            raise ValueError("--gpus and --gpu-memory-gib are required with --device gpu, e.g. --gpus 8 "
                             "--gpu-memory-gib 80 (or --device cpu)")
        cluster = make_cluster(args.gpus, args.gpu_memory_gib, args.gpus_per_node, args.cpu_memory_gib,
                               args.headroom)
        plan = make_plan(cfg, cluster, args.variant, args.job, args.image_size, args.proprio_dim, args.action_dim)
    except (ConfigError, KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if plan.deepspeed is not None else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(plan.deepspeed, indent=2) + "\n")
    print(render(plan, out))
    return 0 if plan.fits_cluster else 1
