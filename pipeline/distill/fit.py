"""Fitting a routed student (stage 2): the worker loop on every Ray Train worker, and the driver that checks the
teacher's labels and probes, starts the fit and publishes the student."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.config import DistillSection, PipelineConfig, RouterSection, layers_per_call
from pipeline.data import storage
from pipeline.data.augment import random_shift
from pipeline.data.batches import Normalizer, to_model_batch
from pipeline.data.ingest import quiet_ray_data
from pipeline.data.labelled import check_teacher, open_labelled, read_labels
from pipeline.data.manifest import Manifest, read_manifest
from pipeline.data.shards import open_shards, shuffle_each_epoch, split_episodes
from pipeline.data.validate import validate_shards
from pipeline.distill.objective import StudentObjective, teacher_targets
from pipeline.errors import StaleInput
from pipeline.models.checkpoint import (
    PROBES_CONFIG,
    PolicyCard,
    load_exactly,
    policy_weights,
    probe_weights,
    read_policy_config,
    read_probes_config,
)
from pipeline.models.graph import ProbeSet
from pipeline.models.router import Router, evenly_spaced_layers
from pipeline.models.student import DistillModule, student_config
from pipeline.models.vla import VLA, VLAConfig
from pipeline.ray_runtime import is_local
from pipeline.stages import RunPaths
from pipeline.train.device import move, placement, resolve_device
from pipeline.train.driver import TrainRun, fit, publish_policy
from pipeline.train.engine import building, full_state_dict, init_worker, make_engine
from pipeline.train.loop import Export, Ledger, MetricLog, Tracking, float_dtype, run_steps


@dataclass(frozen=True)
class StudentJob:
    """What every distill worker receives: its config sections and what the driver resolved from the run."""

    router: RouterSection
    distill: DistillSection                # the loss weights, objective, teacher mode and distill.train
    teacher_uri: str
    teacher_hash: str
    probes_uri: str
    image_shape: tuple[int, int, int]
    card: PolicyCard                       # the exported student's config.json, less the weights
    tracking: Tracking
    seed: int
    eval_every: int = 0                    # distill.eval_every, or 0 when there are no held-out episodes
    ledger_dir: str | None = None          # where rank r appends rank{r}.jsonl (train.ledger); None: no ledger
    attention: str = "sdpa"                # model.attention: the decoder's attention implementation


@dataclass(frozen=True)
class DistillResult:
    student_uri: str
    teacher_hash: str
    metrics: dict[str, float]


@torch.no_grad()
def _val_action_mse(student: VLA, normalizer: Normalizer, job: StudentJob, dtype: torch.dtype,
                    lockstep: bool = False) -> float:
    """Held-out action MSE of the student as deployed (hard gates), all-reduced over the workers.

    lockstep (ZeRO-3, 2+ workers): a layer call gathers that layer's weights with a collective, so every rank
    makes the same forwards (a rank whose shard ran out makes uncounted ones) calling the same layers (see
    router.decide); the sums, and so the MSE, are those of one process over the same rows."""
    student.eval()
    device = next(student.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    batches = ray.train.get_dataset_shard("val").iter_batches(batch_size=job.distill.train.batch_size,
                                                               batch_format="numpy")
    for batch in _in_step(batches, lockstep, device):
        if batch is None:
            student(*_idle_inputs(student, job.image_shape, dtype), mode="hard", threshold=job.router.threshold,
                    lockstep=True)
            continue
        b = move(to_model_batch(batch, normalizer, job.image_shape), device)
        out = student(b["images"].to(dtype), b["instructions"], b["proprio"].to(dtype), mode="hard",
                      threshold=job.router.threshold, lockstep=lockstep)
        totals[0] += float(((out.actions.float() - b["actions"]) ** 2).sum())
        totals[1] += b["actions"].numel()
    student.train()
    if dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def _in_step(batches: Iterable[dict[str, np.ndarray]], lockstep: bool,
             device: torch.device) -> Iterator[dict[str, np.ndarray] | None]:
    """This rank's batches; in lockstep, then None until every rank's shard has run out (Ray may split the
    rows unevenly): one all-reduce of one int32 per batch, so all ranks loop the same number of times."""
    if not lockstep:
        yield from batches
        return
    mine = iter(batches)
    while True:
        batch = next(mine, None)
        more = torch.tensor([batch is not None], dtype=torch.int32, device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        yield batch


def _idle_inputs(student: VLA, image_shape: tuple[int, int, int],
                 dtype: torch.dtype) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """One black frame, zero proprio: the input of a forward a rank makes only to stay in step."""
    h, w, c = image_shape
    device = next(student.parameters()).device
    return (torch.zeros(1, c, h, w, dtype=dtype, device=device), ["idle"],
            torch.zeros(1, student.cfg.proprio_dim, dtype=dtype, device=device))


def fixed_layers(router: RouterSection, distill: DistillSection, num_layers: int) -> tuple[int, ...] | None:
    """The layers a static or shallow student always runs (router.static_layers, else the evenly spaced rule at
    router.budget); None for a routed student."""
    if distill.family == "routed":
        return None
    if router.static_layers:
        return tuple(router.static_layers)
    return evenly_spaced_layers(router.budget, num_layers)


def router_keep(router: RouterSection, distill: DistillSection, num_layers: int) -> int | None:
    """The layers a top-k routed student runs per call (router.select=topk); None for a threshold router or a
    static or shallow student."""
    if distill.family != "routed" or router.select != "topk":
        return None
    return layers_per_call(router.budget, num_layers)


def start_router(router: Router, layers: tuple[int, ...]) -> None:
    """router.start=static: the fresh router opens `layers` (under ZeRO-3 its bias gathered, set on rank 0 and
    partitioned again)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([router.out.bias], modifier_rank=0):
        router.start_from(layers)


def _student_objective(job: StudentJob, device: torch.device) -> tuple[StudentObjective, PolicyCard]:
    """Student = teacher weights + router + stage-1 probes; online mode adds frozen copies of both (the labellers
    of stage 1). Built in the training plane's context (partitioned as constructed under ZeRO-3, the frozen copies
    in the training dtype), then filled tensor by tensor from the mapped teacher and probe files."""
    teacher_card = read_policy_config(job.teacher_uri)
    teacher_cfg = VLAConfig(**teacher_card.vla)
    dims = read_probes_config(job.probes_uri)["dims"]
    static = fixed_layers(job.router, job.distill, teacher_cfg.num_layers)
    online = job.distill.teacher_mode == "online"
    with building(job.distill.train, device, teacher_cfg.hidden_size):
        keep = router_keep(job.router, job.distill, teacher_cfg.num_layers)
        module = DistillModule(VLA(student_config(teacher_cfg, job.router.hidden, static, keep, job.router.pinned)),
                               ProbeSet(**dims))
        frozen = (VLA(teacher_cfg), ProbeSet(**dims)) if online else (None, None)
        objective = StudentObjective(module, job.router, job.distill, *frozen)
    with policy_weights(job.teacher_uri, teacher_card) as weights, probe_weights(job.probes_uri) as probes:
        load_exactly(module.student, weights, allowed_missing="router")   # the router is the student's own, fresh
        if job.router.start == "static" and module.student.router is not None and static is None:
            start_router(module.student.router, evenly_spaced_layers(job.router.budget, teacher_cfg.num_layers))
        load_exactly(module.probes, probes)
        if objective.teacher is not None and objective.teacher_probes is not None:
            load_exactly(objective.teacher, weights)
            load_exactly(objective.teacher_probes, probes)
    if job.distill.objective == "action_regression" or job.distill.family == "shallow":
        # No per-layer ActDistill terms: the probes get no gradient and are not exported (the shallow family reads
        # features through them as the teacher's fixed feature maps).
        module.probes.requires_grad_(False)
    return objective, teacher_card


def student_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Stage 2: the routed student (teacher weights + router + stage-1 probes) under the ActDistill loss."""
    job: StudentJob = loop_config["job"]
    train = job.distill.train
    torch.manual_seed(job.seed)   # the fresh router: identical on every rank
    device = ray.train.torch.get_device()   # this worker's GPU when the driver asked for GPUs, else cpu
    init_worker(device)
    objective, teacher_card = _student_objective(job, device)
    for vla in (objective.distill.student, objective.teacher):   # the teacher: online mode only
        if vla is not None:
            vla.set_attention(job.attention)
    if train.activation_checkpointing:
        objective.distill.student.checkpoint_layers()
    student_cfg = objective.distill.student.cfg
    own_lr = {"distill.student.router": job.router.lr} if job.router.lr else None
    engine, _ = make_engine(objective, train, own_lr, device=device, hidden_size=student_cfg.hidden_size)
    normalizer = Normalizer.from_dict(teacher_card.normalizer)
    rank = ray.train.get_context().get_world_rank()
    log = MetricLog(job.tracking, rank == 0)
    dtype = float_dtype(train)
    cached = job.distill.teacher_mode == "cached"

    def step_fn(batch: dict[str, np.ndarray], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        b = to_model_batch(batch, normalizer, job.image_shape)
        targets = move(teacher_targets(batch, job.teacher_hash, student_cfg.num_layers), device) if cached else None
        # Shifts only in online mode (the config refuses them with cached labels): there the frozen teacher
        # labels the same shifted images inside the objective. run_steps seeds it per rank and micro-batch.
        images = random_shift(b["images"], train.augment_shift)
        images, proprio = images.to(device, dtype), b["proprio"].to(device, dtype)
        loss, parts, executed = engine(images, b["instructions"], proprio, b["actions"].to(device), targets,
                                       objective.temperature(step), objective.topk_at(step))
        return loss, {**parts, "executed_fraction": float(executed), **placement(engine, device, images, proprio)}

    def eval_fn(step: int) -> dict[str, float]:
        # ZeRO-3 partitions the weights: a hard-routed pass must keep the ranks in step (see _val_action_mse).
        lockstep = (engine.zero_optimization_partition_weights() and dist.is_initialized()
                    and dist.get_world_size() > 1)
        val = _val_action_mse(engine.module.distill.student, normalizer, job, dtype, lockstep)
        log.log({"val/action_mse": val}, step)
        return {"val_action_mse": val, "step": step}

    def state() -> dict[str, torch.Tensor]:
        return full_state_dict(engine, "distill.student.")

    run_steps(engine, train, job.seed, log, Ledger(job.ledger_dir, rank), Export(state, student_cfg, job.card),
              step_fn, eval_fn, job.eval_every)


def check_probes(probes_uri: str, teacher_hash: str) -> None:
    """The stage-1 probes are the student's heads and, online, the teacher's labellers: same teacher only."""
    made_by = read_probes_config(probes_uri).get("teacher_hash")
    if made_by != teacher_hash:
        raise StaleInput(f"{storage.join(probes_uri, PROBES_CONFIG)}: the probes were trained on teacher "
                         f"{made_by}, but the teacher checkpoint "
                         f"is {teacher_hash}; re-run `actdistill probe-teacher` for this teacher")


def _datasets(cfg: PipelineConfig, manifest: Manifest, teacher_hash: str) -> dict[str, ray.data.Dataset]:
    """cached: probe-teacher's labelled shards (refused if another teacher made them); online: raw shards."""
    paths = RunPaths.of(cfg)
    train_ids, val_ids = split_episodes(manifest, cfg.data.val_fraction)
    if cfg.distill.teacher_mode == "cached":
        check_teacher(read_labels(paths.labelled), teacher_hash, paths.labelled)

        def rows(ids: set[str]) -> ray.data.Dataset:
            return open_labelled(paths.labelled, episodes=ids, cache=cfg.data.cached)
    else:
        report = validate_shards(paths.shards, manifest, cfg.data.on_bad_rows, cache_dir=paths.validation)

        def rows(ids: set[str]) -> ray.data.Dataset:
            return open_shards(paths.shards, manifest, episodes=ids, skip_rows=report.skip_rows,
                               cache=cfg.data.cached)
    datasets = {"train": shuffle_each_epoch(rows(train_ids), cfg.run.seed)}
    if val_ids and cfg.distill.eval_every:
        datasets["val"] = rows(val_ids)
    return datasets


def fit_student(cfg: PipelineConfig, tracking: Tracking, student_uri: str, run: TrainRun,
                reserved: float = 0.0, callbacks: list[Any] | None = None) -> DistillResult:
    """Labels or probes made by another teacher are refused before any worker starts."""
    quiet_ray_data(cfg.run.verbose)   # a sweep trial runs this in a process of its own
    paths = RunPaths.of(cfg)
    teacher_uri, probes_uri = str(paths.teacher), str(paths.probes)
    teacher_card = read_policy_config(teacher_uri)
    check_probes(probes_uri, teacher_card.hash)
    manifest = read_manifest(paths.shards)
    datasets = _datasets(cfg, manifest, teacher_card.hash)
    card = PolicyCard(role="student", teacher_hash=teacher_card.hash, router_budget=cfg.router.budget,
                      threshold=cfg.router.threshold, data_content_hash=manifest.content_hash,
                      config_digest=cfg.digest(), normalizer=teacher_card.normalizer,
                      instructions=manifest.instructions)
    job = StudentJob(router=cfg.router, distill=cfg.distill, teacher_uri=teacher_uri, teacher_hash=teacher_card.hash,
                     probes_uri=probes_uri, image_shape=tuple(manifest.image_shape), card=card, tracking=tracking,
                     seed=cfg.run.seed, eval_every=cfg.distill.eval_every if "val" in datasets else 0,
                     ledger_dir=run.ledger_dir if cfg.distill.train.ledger else None, attention=cfg.model.attention)
    metrics, checkpoint = fit(student_fn_per_worker, job, datasets, cfg.distill.train, run,
                              local=is_local(cfg), reserved=reserved, callbacks=callbacks, device=resolve_device(cfg))
    publish_policy(checkpoint, student_uri)
    return DistillResult(student_uri=student_uri, teacher_hash=teacher_card.hash,
                         metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
