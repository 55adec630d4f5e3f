"""Stage 1: train per-layer probes on the frozen teacher, then label every row with its targets.

The labels come from the ungated teacher in eval mode (the reference code used a random-router
student in train mode) and are keyed by (episode_id, step, teacher hash), never by batch position.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray.data
import torch
import torch.nn.functional as F

from pipeline.config import ModelSection, ProbeSection
from pipeline.data.batches import Normalizer, to_model_batch
from pipeline.models.checkpoint import load_policy, load_probes
from pipeline.models.graph import ProbeSet
from pipeline.models.vla import VLA

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
               normalizer: Normalizer, image_shape: tuple[int, int, int], seed: int) -> list[float]:
    """mean_l MSE(a_l, a_gt) with the teacher frozen; returns the loss per step."""
    torch.manual_seed(seed)
    teacher.eval().requires_grad_(False)
    probes.train()
    optimizer = torch.optim.AdamW(probes.parameters(), lr=cfg.lr)
    losses: list[float] = []
    while len(losses) < cfg.steps:
        seen = 0
        for batch in data.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=True,
                                       local_shuffle_buffer_size=4 * cfg.batch_size, local_shuffle_seed=seed):
            seen += 1
            losses.append(_probe_step(teacher, probes, optimizer, to_model_batch(batch, normalizer, image_shape)))
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
                 image_shape: tuple[int, int, int]) -> None:
        torch.set_num_threads(1)
        self.teacher, meta = load_policy(teacher_uri)
        self.probes, _ = load_probes(probes_uri)
        self.probes.eval()
        self.normalizer = Normalizer.from_dict(meta["normalizer"])
        self.teacher_hash, self.image_shape = teacher_hash, image_shape

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = to_model_batch(batch, self.normalizer, self.image_shape)
        hidden, mask, action = _teacher_hidden(self.teacher, b)
        sem, act = self.probes(hidden, mask)                # L x B x S, L x B x A
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
               image_shape: tuple[int, int, int], batch_size: int) -> ray.data.Dataset:
    return data.map_batches(TeacherLabeler, batch_format="numpy", batch_size=batch_size,
                            fn_constructor_kwargs=dict(teacher_uri=teacher_uri, probes_uri=probes_uri,
                                                       teacher_hash=teacher_hash, image_shape=image_shape),
                            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
