"""Stage 1: train per-layer probes on the frozen teacher, then label every row with its targets.

The labels come from the ungated teacher in eval mode (the reference code used a random-router
student in train mode) and are keyed by (episode_id, step, teacher hash), never by batch position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data
import torch
import torch.nn.functional as F

from pipeline.config import ModelSection, PipelineConfig, ProbeSection
from pipeline.data.batches import Normalizer, to_model_batch
from pipeline.data.labelled import Labels, clear, open_labelled, write_labels
from pipeline.data.manifest import read_manifest
from pipeline.data.shards import open_shards, split_episodes
from pipeline.data.validate import validate_shards
from pipeline.models.checkpoint import load_policy, load_probes, save_probes
from pipeline.models.graph import ProbeSet
from pipeline.models.vla import VLA
from pipeline.stages import RunPaths
from pipeline.train.device import move, resolve_device

log = logging.getLogger(__name__)


def new_probes(teacher: VLA, model: ModelSection) -> ProbeSet:
    return ProbeSet(teacher.cfg.num_layers, teacher.cfg.hidden_size, model.graph_width, model.semantic_dim,
                    model.top_k, model.graph_heads, teacher.cfg.action_dim)


@torch.no_grad()
def _teacher_hidden(teacher: VLA, b: dict[str, Any]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-layer hidden states, token mask and the action of the ungated teacher."""
    out = teacher(b["images"], b["instructions"], b["proprio"], mode="off", record=True)
    return out.hidden, out.token_mask, out.actions


def fit_probes(teacher: VLA, probes: ProbeSet, data: ray.data.Dataset, cfg: ProbeSection,
               normalizer: Normalizer, image_shape: tuple[int, int, int], seed: int,
               device: torch.device | None = None) -> list[float]:
    """mean_l MSE(a_l, a_gt) with the teacher frozen, on `device` (None: cpu); returns the loss per step."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    teacher.to(device)
    probes.to(device)
    teacher.eval().requires_grad_(False)
    probes.train()
    optimizer = torch.optim.AdamW(probes.parameters(), lr=cfg.lr)
    losses: list[float] = []
    while len(losses) < cfg.steps:
        seen = 0
        for batch in data.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=True,
                                       local_shuffle_buffer_size=4 * cfg.batch_size, local_shuffle_seed=seed):
            seen += 1
            b = move(to_model_batch(batch, normalizer, image_shape), device)
            losses.append(_probe_step(teacher, probes, optimizer, b))
            if len(losses) == cfg.steps:
                break
        if seen == 0:
            raise ValueError(f"the training split holds fewer rows than probe.batch_size={cfg.batch_size}; "
                             f"lower it or collect more episodes")
    return losses


def _probe_step(teacher: VLA, probes: ProbeSet, optimizer: torch.optim.Optimizer, b: dict[str, Any]) -> float:
    hidden, mask, _ = _teacher_hidden(teacher, b)
    _, actions = probes(hidden, mask)                       # L x B x A
    loss = F.mse_loss(actions, b["actions"].expand_as(actions))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


class TeacherLabeler:
    """Ray Data map_batches callable: adds teacher_hash, teacher_sem (L*S), teacher_act (L*A) and
    teacher_action (A, the teacher's own output) per row."""

    def __init__(self, teacher_uri: str, probes_uri: str, teacher_hash: str,
                 image_shape: tuple[int, int, int], device: str = "cpu", attention: str = "sdpa") -> None:
        torch.set_num_threads(1)
        self.device = torch.device(device)   # cuda: the one GPU Ray gave this actor (visible as cuda:0)
        self.teacher, card = load_policy(teacher_uri)
        self.teacher.set_attention(attention).to(self.device)
        self.probes, _ = load_probes(probes_uri)
        self.probes.eval().to(self.device)
        self.normalizer = Normalizer.from_dict(card.normalizer)
        self.teacher_hash, self.image_shape = teacher_hash, image_shape

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = move(to_model_batch(batch, self.normalizer, self.image_shape), self.device)
        hidden, mask, action = _teacher_hidden(self.teacher, b)
        sem, act, action = (t.float().cpu() for t in (*self.probes(hidden, mask), action))  # L x B x S, L x B x A
        rows = len(b["instructions"])
        out = dict(batch)
        out["teacher_hash"] = np.full(rows, self.teacher_hash)
        out["teacher_sem"] = sem.transpose(0, 1).reshape(rows, -1).numpy().astype(np.float32)
        out["teacher_act"] = act.transpose(0, 1).reshape(rows, -1).numpy().astype(np.float32)
        out["teacher_action"] = action.numpy().astype(np.float32)
        if not all(np.isfinite(out[k]).all() for k in ("teacher_sem", "teacher_act", "teacher_action")):
            raise FloatingPointError("teacher labels contain NaN/inf; the teacher or probes are broken")
        return out


def label_rows(data: ray.data.Dataset, teacher_uri: str, probes_uri: str, teacher_hash: str,
               image_shape: tuple[int, int, int], batch_size: int, device: str = "cpu",
               attention: str = "sdpa") -> ray.data.Dataset:
    """One labelling actor: 1 CPU, and on cuda 1 GPU too."""
    return data.map_batches(TeacherLabeler, batch_format="numpy", batch_size=batch_size,
                            fn_constructor_kwargs=dict(teacher_uri=teacher_uri, probes_uri=probes_uri,
                                                       teacher_hash=teacher_hash, image_shape=image_shape,
                                                       device=device, attention=attention),
                            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1,
                            num_gpus=1 if device == "cuda" else 0)


@dataclass(frozen=True)
class ProbeResult:
    probes_uri: str
    labelled_uri: str
    rows: int
    final_probe_mse: float
    losses: list[float]          # the probe loss per training step
    skipped_bad_rows: int
    teacher_hash: str


def probe_teacher(cfg: PipelineConfig) -> ProbeResult:
    """Driver side of stage 1: fit the probes on the frozen teacher, then label every row (train and
    validation; distill picks its split by episode id) and check that every usable row was written."""
    paths = RunPaths.of(cfg)
    teacher_uri, probes_uri = str(paths.teacher), str(paths.probes)
    manifest = read_manifest(paths.shards)
    # Same checks as train-teacher (stored in the run, so a later stage reuses them): a bad shard stops the
    # job naming file, row and fix, or with data.on_bad_rows=skip its bad rows are left out and counted.
    report = validate_shards(paths.shards, manifest, cfg.data.on_bad_rows, cache_dir=paths.validation)
    device = resolve_device(cfg)
    teacher, card = load_policy(teacher_uri)
    teacher.set_attention(cfg.model.attention)
    if manifest.content_hash != card.data_content_hash:
        raise ValueError(f"the teacher at {teacher_uri} was trained on data {card.data_content_hash}, but "
                         f"{paths.shards} holds {manifest.content_hash}; re-run train-teacher")
    train_ids, _ = split_episodes(manifest, cfg.data.val_fraction)
    image_shape = tuple(manifest.image_shape)
    # Seeded here: the probes' initial weights drew from whatever the process's generator held (two runs of
    # the same config gave different probes, hence different labels and students).
    torch.manual_seed(cfg.run.seed)
    probes = new_probes(teacher, cfg.model)
    train_rows = open_shards(paths.shards, manifest, episodes=train_ids, skip_rows=report.skip_rows)
    # The probes train in this (driver) process: on its GPU when the run is on cuda and it has one.
    here = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
    losses = fit_probes(teacher, probes, train_rows, cfg.probe, Normalizer.from_dict(card.normalizer),
                        image_shape, cfg.run.seed, here)
    save_probes(probes.cpu(), probes_uri, {"teacher_hash": card.hash})
    clear(paths.labelled)
    labelled = label_rows(open_shards(paths.shards, manifest, skip_rows=report.skip_rows, cache=False),
                          teacher_uri, probes_uri, card.hash, image_shape, cfg.probe.batch_size, device,
                          cfg.model.attention)
    labelled.write_parquet(paths.labelled)
    # Counted from the files as written (one pass, nothing cached); bad rows left out are not expected.
    written, expected = open_labelled(paths.labelled, cache=False).count(), manifest.num_steps - report.num_bad
    if written != expected:
        raise RuntimeError(f"labelled {written} rows but the shards hold {expected} usable rows "
                           f"({report.num_bad} bad); see the Ray Data logs above and re-run probe-teacher")
    write_labels(paths.labelled, Labels(teacher_hash=card.hash, source_content_hash=manifest.content_hash,
                                        num_layers=teacher.cfg.num_layers, semantic_dim=cfg.model.semantic_dim,
                                        action_dim=teacher.cfg.action_dim, num_rows=written))
    return ProbeResult(probes_uri=probes_uri, labelled_uri=paths.labelled, rows=written,
                       final_probe_mse=float(np.mean(losses[-max(1, len(losses) // 5):])), losses=losses,
                       skipped_bad_rows=report.num_bad, teacher_hash=card.hash)
