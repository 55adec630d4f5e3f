"""Typed pipeline config: YAML loading, dotted overrides, and validation that reports every problem at once."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import UserError
from pipeline.sim.tasks import TASKS


def layers_per_call(budget: float, num_layers: int) -> int:
    """How many layers run per call at a budget: round(budget x L), at least one (a router.select=topk student's
    count, and a static or shallow student's)."""
    return min(num_layers, max(1, round(budget * num_layers)))


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message lists every bad key with its value and a fix."""


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


# json_schema_extra of an option added after runs were made, whose default keeps the earlier behaviour: at its
# default it is left out of the config digest, so runs (and --resume / --reuse) made before it stay current.
NEUTRAL_AT_DEFAULT = {"digest": "omit_at_default"}


def _drop_neutral_defaults(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """`data` (model's JSON dump) less the NEUTRAL_AT_DEFAULT options that hold their default, at any depth."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel) and isinstance(data.get(name), dict):
            _drop_neutral_defaults(value, data[name])
        elif field.json_schema_extra == NEUTRAL_AT_DEFAULT and value == field.default:
            data.pop(name, None)
    return data


class RunSection(_Section):
    name: str = Field("smoke", min_length=1, description="a name for this pipeline run, e.g. smoke")
    run_dir: str = Field("runs/smoke", min_length=1,
                         description="folder holding everything this run writes, e.g. runs/smoke")
    seed: int = Field(0, ge=0, description="global seed, a non-negative integer")
    ray_address: str | None = Field(
        None, description="a Ray cluster's head, HOST:6379 (or ray://HOST:10001), that the job joins; null (and no "
                          "RAY_ADDRESS) for a Ray instance of the job's own, whatever `ray start` left on the machine")
    ray_num_cpus: int | None = Field(None, ge=1,
                                     description="logical CPUs of a local Ray, or null for the machine's")
    resume: str | None = Field(None, min_length=1,
                               description="the Ray Train run name of an interrupted train-teacher or distill "
                                           "run to continue from its last checkpoint (the job prints it and tags "
                                           "it in MLflow as ray_run_name); null for a fresh run")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where train-teacher, distill, probe-teacher and evaluate compute: cpu (gloo), cuda "
                            "(one GPU per Ray Train worker, NCCL) or auto (cuda when the Ray cluster, or this "
                            "machine for a local Ray, has GPUs, else cpu)")
    verbose: bool = Field(False, description="true: Ray Data's progress bars and Ray's INFO/WARNING logs from its "
                                             "workers (`--verbose`); false: one progress line per training stage")


class CollectSection(_Section):
    tasks: list[str] = Field(["reach-v3", "push-v3"], min_length=1,
                             description="Meta-World task names such as reach-v3")
    episodes_per_task: int = Field(3, ge=1, description="expert episodes per task, e.g. 3")
    image_size: int = Field(64, ge=16, le=512, description="square render size in pixels, e.g. 64")
    camera: str = Field("corner", description="a Meta-World camera name, e.g. corner")
    max_steps: int = Field(150, ge=1, le=500, description="step limit per episode (Meta-World allows 500)")
    seed: int = Field(0, ge=0, description="first episode seed; episode i of a task uses seed + i")
    rows_per_shard: int = Field(2000, ge=1, description="rows per Parquet shard, e.g. 2000")
    keep_failed: bool = Field(False, description="true to keep expert episodes that did not succeed")
    action_noise: float = Field(0.0, ge=0.0, le=1.0,
                                description="std of Gaussian noise added to the executed hand motion (dx, dy, "
                                            "dz) while the stored label stays the expert's action, e.g. 0.3; "
                                            "0 for clean demonstrations")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from Meta-World tasks such as "
                             f"{', '.join(TASKS[:4])} ... ({len(TASKS)} in pipeline/sim/tasks.py)")
        if len(set(tasks)) != len(tasks):
            raise ValueError("a task is listed twice; list each task once")
        return tasks


class DataSection(_Section):
    shards_uri: str | None = Field(None, description="local folder or s3:// URI of trajectory shards; "
                                                     "null for <run_dir>/shards")
    labelled_uri: str | None = Field(None, description="where probe-teacher writes labelled shards; "
                                                       "null for <run_dir>/labelled")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0,
                                description="fraction of episodes held out for validation, in [0, 1)")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="error (stop, naming file and row) or skip (leave bad rows out, counted and logged)")
    cache: Literal["auto", "always", "never"] = Field(
        "auto", description="training rows in Ray's object store: auto (read once and cached when they fit a "
                            "fraction of it), always, or never (streamed from storage on every pass)")

    @property
    def cached(self) -> bool | None:
        """open_shards' cache argument: None decides by size."""
        return {"auto": None, "always": True, "never": False}[self.cache]


class ModelSection(_Section):
    pretrained_backbone: str | None = Field(
        None, description="a Hugging Face decoder folder (local or s3://: config.json, safetensors and the "
                          "tokenizer files) whose architecture, weights and tokenizer the teacher starts from; "
                          "its config.json decides the family and widths below; null to train from scratch")
    pretrained_vlm: str | None = Field(
        None, description="a Hugging Face vision-language model folder (local or s3://; LLaVA, PaliGemma, Idefics3 "
                          "or SmolVLM, as save_pretrained writes it) the teacher is built from: its vision tower + "
                          "projector read the frames, its processor and tokenizer the instruction, its language "
                          "model's decoder layers are the routed layers; the widths, patch_size, vision_stem and "
                          "backbone below do not apply; null for our own vision stem")
    train_vision: bool = Field(False, description="with pretrained_vlm: true to train the vision tower and "
                                                  "projector too; false keeps them frozen")
    action_head: Literal["regression", "tokens"] = Field(
        "regression", description="regression (an MLP to continuous actions, trained with MSE) or tokens (each "
                                  "action dimension in action_bins bins between the data's 1st and 99th "
                                  "percentiles, predicted as tokens with cross-entropy, OpenVLA-style)")
    action_bins: int = Field(256, ge=2, le=65536, description="bins per action dimension of the tokens head, "
                                                              "e.g. 256")
    backbone: Literal["llama", "qwen2", "mistral", "gemma"] = Field(
        "llama", description="decoder family of a from-scratch teacher: llama, qwen2, mistral or gemma")
    hidden_size: int = Field(64, ge=8, description="decoder width, divisible by num_heads")
    num_layers: int = Field(4, ge=1, description="decoder layers, e.g. 4")
    num_heads: int = Field(4, ge=1, description="attention heads, e.g. 4")
    num_kv_heads: int = Field(4, ge=1, description="key/value heads, dividing num_heads")
    intermediate_size: int = Field(128, ge=8, description="MLP width, e.g. 4 x hidden_size")
    patch_size: int = Field(16, ge=2, description="vision patch size in pixels, dividing collect.image_size")
    attention: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="the decoder's attention implementation: sdpa, flash_attention_2 (GPU with the "
                            "flash_attn package; no dense mask is built) or eager")
    vision_stem: Literal["patch", "mlp"] = Field(
        "patch", description="patch (one strided conv) or mlp (4x4 patches -> 64 channels -> GELU -> patch_size)")
    vocab_size: int = Field(512, ge=16, description="hashed instruction-word buckets of a from-scratch teacher, "
                                                     "e.g. 512")
    max_instruction_tokens: int = Field(12, ge=1, description="instruction tokens kept (padded or truncated to), "
                                                              "e.g. 12")
    graph_width: int = Field(32, ge=4, description="graph extractor width (projection of the hidden size)")
    semantic_dim: int = Field(32, ge=4, description="per-layer semantic vector size (512 in the paper)")
    top_k: int = Field(8, ge=1, description="graph neighbours kept per token (8 in the paper)")
    graph_heads: int = Field(4, ge=1, description="graph-attention heads, dividing graph_width")


class TrainSection(_Section):
    steps: int = Field(100, ge=1, description="optimizer steps, e.g. 100")
    batch_size: int = Field(32, ge=1, description="per-worker micro-batch size, e.g. 32")
    lr: float = Field(1e-3, gt=0, le=1.0, description="peak learning rate, e.g. 1e-3")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps, e.g. 10")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay, e.g. 0.01")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip, e.g. 1.0")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps, e.g. 1")
    num_workers: int = Field(2, ge=1, description="Ray Train workers, e.g. 2")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs reserved per worker; 0.5 leaves room "
                                                          "for Ray Data on 2 cores")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32, bf16 or fp16 (GPU only, with DeepSpeed's dynamic loss scaling)")
    activation_checkpointing: bool = Field(
        False, description="true to recompute each decoder layer's activations in backward instead of keeping "
                           "them (~1 extra forward of compute for ~L-fold less activation memory)")
    offload: Literal["none", "optimizer", "all"] = Field(
        "none", description="ZeRO offload to host RAM: none, optimizer (stage >= 1) or all (optimizer and "
                            "parameters, stage 3); `actdistill plan` says when a cluster needs it")
    log_every: int = Field(10, ge=1, description="steps between logged metrics")
    augment_shift: int = Field(0, ge=0, le=16, description="random-shift augmentation of training images: pad "
                                                           "by this many pixels and crop back at random, 0 for none "
                                                           "(distill: with teacher_mode online only)")
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps between resumable checkpoints "
                                                       "(DeepSpeed state + exported policy); 0: only at the end")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on storage (oldest deleted), e.g. 2")
    max_failures: int = Field(0, ge=-1, description="worker failures to recover from by restarting from the "
                                                    "last checkpoint; 0: none, -1: unlimited")
    ledger: bool = Field(False, description="true to record, per rank and optimizer step, a digest of the rows "
                                            "trained on (audits data order across restarts)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers on nodes: PACK (few nodes), SPREAD, STRICT_PACK (one node) "
                            "or STRICT_SPREAD (each worker on a node of its own)")
    node_labels: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels every worker's node must carry (Ray Train's "
                                          "label_selector), e.g. {ray.io/node-group: gpu-workers}; empty: any node")


class ProbeSection(_Section):
    steps: int = Field(100, ge=1, description="stage-1 probe training steps, e.g. 100")
    batch_size: int = Field(32, ge=1, description="probe batch size, e.g. 32")
    lr: float = Field(3e-3, gt=0, le=1.0, description="probe learning rate, e.g. 3e-3")


class RouterSection(_Section):
    budget: float = Field(0.5, gt=0.0, le=1.0, description="the fraction of layers to run, e.g. 0.5")
    budget_scope: Literal["batch", "input"] = Field(
        "batch", description="batch: the budget bounds the batch's mean executed fraction (inputs may differ); "
                             "input: it bounds every input's own fraction, so each batch-1 call runs about "
                             "budget x layers")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="inference gate threshold in (0, 1)")
    select: Literal["threshold", "topk"] = Field(
        "threshold", description="how a routed student picks its layers at inference. threshold: every layer whose "
                                 "gate >= router.threshold, so the count varies per call; topk: exactly "
                                 "round(budget x layers) per call, the ones with the largest gates, so the budget "
                                 "holds on every call (training is the same; pair it with budget_scope=input)")
    gate: Literal["soft", "straight_through", "annealed"] = Field(
        "straight_through", description="training gate: soft, straight_through or annealed")
    anneal_to: float = Field(0.05, gt=0.0, le=1.0,
                             description="final gate temperature when gate=annealed (1 -> this), e.g. 0.05")
    topk_phase: float = Field(
        0.0, ge=0.0, le=1.0, description="router.select=topk: the last fraction of distill steps trained with the "
                                         "pattern deployment runs (each input's round(budget x layers) largest "
                                         "gates forward, the gates' gradient backward), e.g. 0.3; 0: none",
        json_schema_extra=NEUTRAL_AT_DEFAULT)
    start: Literal["open", "static"] = Field(
        "open", description="a fresh router's gates. open: all ~0.88, the student starts as its teacher; static: "
                            "open (+2 logits) at the static student's layers (round(budget x layers), evenly "
                            "spaced, ending at the last) and closed (-2) elsewhere, so with router.topk_phase=1 "
                            "the student starts as the static one and the router learns where an input needs "
                            "other layers", json_schema_extra=NEUTRAL_AT_DEFAULT)
    pinned: list[int] | None = Field(
        None, description="layers a routed student runs for every input, 0-based, e.g. [7] (the last layer, which "
                          "feeds the action head): their gates are fixed at 1 and count toward router.budget, so "
                          "the router chooses the rest; null: the router chooses every layer",
        json_schema_extra=NEUTRAL_AT_DEFAULT)
    hidden: int = Field(32, ge=4, description="router feature width, e.g. 32")
    calibrate_episodes: int = Field(
        0, ge=0, description="closed-loop episodes per task on which a routed student's threshold is calibrated "
                             "after distill, so it runs `budget` of its layers on its own trajectories (3 rollouts "
                             "on seeds apart from evaluation's), e.g. 3; 0: keep router.threshold")
    lr: float | None = Field(
        None, gt=0, le=1.0, description="the router's peak learning rate, e.g. 3e-4, when the student's layers "
                                        "(taken from a converged teacher) train at a lower distill.train.lr; "
                                        "null: distill.train.lr for the router too")
    static_layers: list[int] | None = Field(
        None, description="the layers a static or shallow student (distill.family) runs, 0-based, e.g. [1, 3, 5, 7]; "
                          "null: round(budget x layers) of them, evenly spaced and ending at the last")


class DistillSection(_Section):
    alpha: float = Field(1.0, ge=0, description="weight of semantic alignment + structure, >= 0")
    beta: float = Field(1.0, ge=0, description="weight of per-layer action losses, >= 0")
    eta: float = Field(0.5, ge=0, description="weight of the structure term inside alpha, >= 0")
    gamma: float = Field(2.0, ge=0, description="layer-weight exponent (2 in the paper), >= 0")
    budget_weight: float = Field(1.0, ge=0, description="weight of (mean gate - budget)^2, >= 0")
    balance_weight: float = Field(0.0, ge=0, description="weight of the per-layer balance term, >= 0")
    eval_every: int = Field(20, ge=0, description="optimizer steps between held-out action-error reports "
                                                  "(what ASHA reads); 0 for none")
    objective: Literal["actdistill", "action_regression"] = Field(
        "actdistill", description="actdistill (graph-structured per-layer alignment, docs/method.md) or "
                                  "action_regression (ablation: only the final action, regressed to the expert's "
                                  "and the teacher's, plus the budget term)")
    family: Literal["routed", "static", "shallow"] = Field(
        "routed", description="routed (a learned router picks the layers per input), static (a fixed set of "
                              "layers, router.static_layers or round(router.budget x L) evenly spaced, trained with "
                              "distill.objective) or shallow (the same fixed layers as a dense shallower stack, "
                              "distilled Shallow-pi-like: task + teacher action + feature alignment at each kept "
                              "layer; distill.objective does not apply)")
    teacher_mode: Literal["cached", "online"] = Field(
        "cached", description="cached (teacher targets from probe-teacher's labelled shards) or online (the "
                              "frozen teacher runs inside each step; partitioned with the student under ZeRO-3)")
    train: TrainSection = TrainSection()


class EvaluateSection(_Section):
    episodes_per_task: int = Field(2, ge=1, description="closed-loop episodes per task, e.g. 20")
    seed: int = Field(10_000, ge=0, description="first evaluation seed, apart from collect seeds")
    max_steps: int = Field(150, ge=1, le=500, description="step limit per evaluation episode")
    latency_calls: int = Field(30, ge=3, description="batch-1 policy calls timed per policy")
    latency_threads: int = Field(1, ge=1, description="torch intra-op threads while timing batch-1 calls, e.g. 1 "
                                                      "(a controller's core; at batch 1 more threads mostly add "
                                                      "synchronisation, and on a busy machine a lot of it)")
    num_workers: int = Field(2, ge=1, description="Ray rollout actors (1 CPU each), e.g. the number of cores")
    envs_per_worker: int = Field(8, ge=1, description="environments each actor steps in lockstep; one batched "
                                                      "policy call per step serves them all, e.g. 8")
    extra: dict[str, str] = Field(
        {}, description="more policies to evaluate beside teacher and student, name -> checkpoint folder "
                        "(under run.run_dir, or an absolute/s3:// URI), e.g. {no-budget: ablations/no-budget}")


class SweepSection(_Section):
    space: str = Field("tune_spaces/smoke.yaml", description="a YAML search space under tune_spaces/")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha (stop weak trials early on held-out "
                                                                   "action error) or fifo")
    grace_period: int = Field(1, ge=1, description="validation reports before ASHA may stop a trial")
    reduction_factor: int = Field(2, ge=2, description="ASHA keeps 1/reduction_factor of trials per rung")
    num_samples: int = Field(1, ge=1, description="samples per grid point, e.g. 1")
    max_concurrent_trials: int = Field(1, ge=1, description="trials at once (1 on 2 cores)")
    eval_episodes_per_task: int = Field(1, ge=1, description="closed-loop episodes per task per trial")
    trial_max_failures: int = Field(
        1, ge=0, description="times Tune restarts a failed trial; the restart continues its distill from the "
                             "trial's own last checkpoint (distill.train.checkpoint_every). A trial failing past "
                             "this is left out of the frontier, and the sweep goes on with the others")


class PromoteSection(_Section):
    model_name: str = Field("actdistill-student", min_length=1, description="registered model name")
    success_delta: float = Field(0.05, ge=0, le=1, description="allowed success drop vs teacher, in [0, 1]")
    compute_budget: float = Field(0.9, gt=0, le=1, description="max student/teacher backbone FLOPs, (0, 1]")
    prefer: Literal["success", "compute"] = Field(
        "success", description="which passing student promote picks: success (the highest success, then the least "
                               "compute) or compute (the least compute, then the simplest family to serve: shallow, "
                               "static, routed; then success)")
    reevaluate_top: int = Field(
        2, ge=1, description="how many of the best sweep students (by their sweep figures) are re-evaluated on "
                             "the teacher's episodes and seeds, best first, until one passes the gate, e.g. 2")


class TrackingSection(_Section):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; null for sqlite in run_dir")
    experiment: str = Field("actdistill", min_length=1, description="MLflow experiment name")
    outage_limit_s: float = Field(
        300.0, gt=0, description="seconds training metrics may wait for an unreachable tracking server (they are "
                                 "kept and sent when it is back); past this the stage fails after its last "
                                 "checkpoint, naming the URI, and --resume continues it")


class PipelineConfig(_Section):
    run: RunSection = RunSection()
    collect: CollectSection = CollectSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    teacher: TrainSection = TrainSection()
    probe: ProbeSection = ProbeSection()
    router: RouterSection = RouterSection()
    distill: DistillSection = DistillSection()
    evaluate: EvaluateSection = EvaluateSection()
    sweep: SweepSection = SweepSection()
    promote: PromoteSection = PromoteSection()
    tracking: TrackingSection = TrackingSection()

    # Where each stage writes is pipeline/stages.py's RunPaths; the tracking store belongs to this section.
    @property
    def tracking_uri(self) -> str:
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        return f"sqlite:///{(Path(self.run.run_dir).resolve() / 'mlflow.db')}"

    def digest(self, sections: tuple[str, ...] | None = None) -> str:
        """A short hash of the resolved config, recorded with every run and model version; with sections,
        of those alone (dotted for one field, e.g. run.seed). run.resume is left out: continuing a run does
        not change what it trains."""
        data = _drop_neutral_defaults(self, self.model_dump(mode="json"))
        data["run"].pop("resume")
        if sections is not None:
            data = {key: functools.reduce(lambda value, part: value[part], key.split("."), data) for key in sections}
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _distinct_layers(layers: list[int], num_layers: int) -> bool:
    """A non-empty list of distinct layer indices in [0, num_layers)."""
    return bool(layers) and len(set(layers)) == len(layers) and all(0 <= i < num_layers for i in layers)


def _cross_checks(cfg: PipelineConfig) -> list[str]:
    """Constraints spanning several keys, reported alongside pydantic's."""
    m, problems = cfg.model, []
    if m.pretrained_vlm and m.pretrained_backbone:
        problems.append(f"model.pretrained_vlm={m.pretrained_vlm!r} and model.pretrained_backbone="
                        f"{m.pretrained_backbone!r}: a teacher starts from one pretrained model; keep "
                        f"pretrained_vlm (a vision-language model brings its own decoder) or pretrained_backbone")
    if m.train_vision and not m.pretrained_vlm:
        problems.append("model.train_vision=true: only a model.pretrained_vlm teacher has a pretrained vision tower "
                        "to freeze or train; set model.pretrained_vlm=FOLDER or leave train_vision false")
    if m.hidden_size % m.num_heads:
        problems.append(f"model.hidden_size={m.hidden_size}: must be divisible by model.num_heads="
                        f"{m.num_heads}; e.g. hidden_size={m.num_heads * 16}")
    if m.num_heads % m.num_kv_heads:
        problems.append(f"model.num_kv_heads={m.num_kv_heads}: must divide model.num_heads={m.num_heads}")
    if m.graph_width % m.graph_heads:
        problems.append(f"model.graph_width={m.graph_width}: must be divisible by model.graph_heads="
                        f"{m.graph_heads}")
    for key, train in (("teacher", cfg.teacher), ("distill.train", cfg.distill.train)):
        needs = {"optimizer": 1, "all": 3}.get(train.offload, 0)
        if train.zero_stage < needs:
            problems.append(f"{key}.offload={train.offload}: needs {key}.zero_stage >= {needs} "
                            f"(it is {train.zero_stage}); raise the stage or set offload=none")
    for name in cfg.evaluate.extra:
        if name in ("teacher", "student"):
            problems.append(f"evaluate.extra.{name}: the names teacher and student are taken by the run's own "
                            f"policies; choose another name")
    static = cfg.router.static_layers
    if static is not None and not _distinct_layers(static, m.num_layers):
        problems.append(f"router.static_layers={static}: needs distinct layer indices in [0, {m.num_layers - 1}] "
                        f"(model.num_layers={m.num_layers}), e.g. [1, 3, 5, 7]; or null for a learned router")
    if static is not None and cfg.distill.family == "routed":
        problems.append(f"router.static_layers={static}: a fixed set of layers is a static or shallow student; set "
                        f"distill.family=static (or shallow), or static_layers=null for a learned router")
    pinned = cfg.router.pinned
    if pinned is not None and not _distinct_layers(pinned, m.num_layers):
        problems.append(f"router.pinned={pinned}: needs distinct layer indices in [0, {m.num_layers - 1}] "
                        f"(model.num_layers={m.num_layers}), e.g. [{m.num_layers - 1}]; or null to route every layer")
    elif pinned is not None and cfg.distill.family != "routed":
        problems.append(f"router.pinned={pinned}: pins layers of a learned router, but distill.family="
                        f"{cfg.distill.family} runs a fixed set (router.static_layers); set router.pinned=null")
    elif pinned is not None and cfg.router.select == "topk" and len(pinned) >= (
            keep := layers_per_call(cfg.router.budget, m.num_layers)):
        problems.append(f"router.pinned={pinned}: {len(pinned)} pinned layers leave the router nothing to choose "
                        f"among the {keep} that router.budget={cfg.router.budget} runs per call; pin fewer layers "
                        f"or raise the budget")
    if cfg.router.select == "topk" and cfg.router.calibrate_episodes:
        problems.append(f"router.calibrate_episodes={cfg.router.calibrate_episodes}: router.select=topk runs "
                        f"round(budget x layers) layers on every call, so there is no inference threshold to "
                        f"calibrate; set calibrate_episodes=0 or router.select=threshold")
    if cfg.router.topk_phase and cfg.router.select != "topk":
        problems.append(f"router.topk_phase={cfg.router.topk_phase}: trains the pattern router.select=topk "
                        f"deploys, but router.select={cfg.router.select}; set router.select=topk or topk_phase=0")
    if cfg.distill.train.augment_shift and cfg.distill.teacher_mode == "cached":
        problems.append(f"distill.train.augment_shift={cfg.distill.train.augment_shift}: cached teacher targets "
                        f"belong to the unshifted images; set distill.teacher_mode=online (the teacher labels "
                        f"the shifted images in each step) or augment_shift=0")
    problems += _device_checks(cfg)
    if cfg.collect.image_size % m.patch_size and not m.pretrained_vlm:
        problems.append(f"model.patch_size={m.patch_size}: must divide collect.image_size="
                        f"{cfg.collect.image_size}; e.g. 8 or 16")
    if m.vision_stem == "mlp" and m.patch_size % 4:
        problems.append(f"model.patch_size={m.patch_size}: model.vision_stem=mlp needs a multiple of 4 "
                        f"(it patchifies 4x4 pixels first); e.g. 8 or 16, or model.vision_stem=patch")
    return problems


def _device_checks(cfg: PipelineConfig) -> list[str]:
    """What run.device=cpu cannot run (auto is checked once it resolves, see pipeline/train/device.py)."""
    if cfg.run.device != "cpu":
        return []
    problems = [f"{key}.precision=fp16: DeepSpeed refuses fp16 on CPU (run.device=cpu); set {key}.precision=bf16 "
                f"or fp32, or run.device=cuda on a GPU machine"
                for key, train in (("teacher", cfg.teacher), ("distill.train", cfg.distill.train))
                if train.precision == "fp16"]
    if cfg.model.attention == "flash_attention_2":
        problems.append("model.attention=flash_attention_2: FlashAttention runs on GPUs only (run.device=cpu); set "
                        "model.attention=sdpa, or run.device=cuda on a GPU machine with flash_attn installed")
    return problems


def _describe(err: dict[str, Any], root: type[BaseModel]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        section = _section_at(root, loc[:-1])
        valid = ", ".join(section.model_fields) if section else "see pipeline/config.py"
        return f"{key}: unknown key; valid keys here are: {valid}"
    field = _field_at(root, loc)
    hint = f"; expected {field.description}" if field is not None and field.description else ""
    return f"{key}={err.get('input')!r}: {err['msg']}{hint}"


def _section_at(root: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    section: type[BaseModel] = root
    for part in loc:
        field = section.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        section = field.annotation
    return section


def _field_at(root: type[BaseModel], loc: list[str]) -> Any:
    # Locations inside lists carry an index ("collect.tasks.0"); stop at the field that owns it.
    section = _section_at(root, [p for p in loc[:-1] if not p.isdigit()])
    name = loc[-1] if not loc[-1].isdigit() else loc[-2]
    if section is None or name not in section.model_fields:
        section = _section_at(root, [p for p in loc[:-2] if not p.isdigit()])
    return section.model_fields.get(name) if section else None


def parse_override(item: str) -> tuple[list[str], Any]:
    """'distill.alpha=0.5' -> (['distill', 'alpha'], 0.5); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE; write e.g. router.budget=0.5")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part; write e.g. router.budget=0.5")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); unknown keys are left for validation to report."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return out


def validate(raw: dict[str, Any], source: str = "<config>") -> PipelineConfig:
    """Build the typed config, raising one ConfigError that lists every problem."""
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, PipelineConfig) for e in exc.errors()]
        raise ConfigError(f"{source}: {len(lines)} problem(s):\n  " + "\n  ".join(lines)) from None
    problems = _cross_checks(cfg)
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """YAML file, then dotted overrides, then validation: the one way a job gets its config."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass e.g. --config jobs/configs/smoke.yaml")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML ({problem}); fix the file (indent with spaces, "
                              f"`key: value` per line), e.g. as in jobs/configs/smoke.yaml") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (run:, collect:, ...)")
        raw = loaded
    return validate(apply_overrides(raw, overrides or []), source)


def with_overrides(cfg: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    """A new validated config with dotted keys replaced (used by sweep trials); cfg is unchanged."""
    items = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return validate(apply_overrides(cfg.model_dump(mode="json"), items), "<sweep trial>")


def flat_params(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as dotted key -> value, for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node if not isinstance(node, list) else ",".join(map(str, node))

    walk("", cfg.model_dump(mode="json"))
    return out
