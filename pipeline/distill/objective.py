"""The stage-2 objective around the routed student, and the ungated teacher's targets it is trained towards."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from pipeline.config import DistillSection, RouterSection
from pipeline.distill.losses import LossWeights, distill_loss, regression_loss, shallow_loss
from pipeline.models.action_head import action_task_loss
from pipeline.models.graph import ProbeSet
from pipeline.models.router import anneal_temperature, budget_gates, forward_mode
from pipeline.models.student import DistillModule
from pipeline.models.vla import VLA


class TeacherTargets(NamedTuple):
    """What the ungated teacher says about a batch (normalised units): cached labels or computed online."""

    sem: torch.Tensor       # L x B x S per-layer semantics (stage-1 probes on the teacher's hidden states)
    act: torch.Tensor       # L x B x A per-layer actions of the same probes
    action: torch.Tensor    # B x A the teacher's own action


class StudentObjective(nn.Module):
    """The stage-2 loss around the student; in online mode it also holds the frozen teacher and the
    stage-1 probes that turn its hidden states into targets (partitioned with the student under ZeRO-3)."""

    def __init__(self, distill: DistillModule, router: RouterSection, settings: DistillSection,
                 teacher: VLA | None = None, teacher_probes: ProbeSet | None = None) -> None:
        super().__init__()
        self.distill, self.router_cfg, self.settings = distill, router, settings
        self.weights = LossWeights.of(router, settings)
        self.teacher, self.teacher_probes = teacher, teacher_probes
        if teacher is not None and teacher_probes is not None:
            teacher.requires_grad_(False)
            teacher_probes.requires_grad_(False)

    def train(self, mode: bool = True) -> StudentObjective:
        # The targets come from the teacher in eval mode, as probe-teacher's cached labels do.
        super().train(mode)
        for frozen in (self.teacher, self.teacher_probes):
            if frozen is not None:
                frozen.eval()
        return self

    @torch.no_grad()
    def online_targets(self, images: torch.Tensor, instructions: list[str], proprio: torch.Tensor
                       ) -> TeacherTargets:
        """The ungated teacher's targets for this batch, as probe-teacher labels them."""
        if self.teacher is None or self.teacher_probes is None:
            raise RuntimeError("online teacher targets need the teacher and its probes in the objective")
        out = self.teacher(images, instructions, proprio, mode="off", record=True)
        sem, act = self.teacher_probes(out.hidden, out.token_mask)
        return TeacherTargets(sem.float(), act.float(), out.actions.float())

    def forward(self, images: torch.Tensor, instructions: list[str], proprio: torch.Tensor,
                actions: torch.Tensor, targets: TeacherTargets | None, temperature: float,
                topk: bool = False) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """topk (a step of router.topk_phase): the student runs each input's top-k layers forward, as deployed."""
        gate, threshold = self.router_cfg.gate, self.router_cfg.threshold
        if targets is None:
            targets = self.online_targets(images, instructions, proprio)
        mode = "topk" if topk else forward_mode(gate)
        head = self.distill.student.action_head
        if self.settings.family == "shallow":
            out, sem_s, _ = self.distill(images, instructions, proprio, mode, threshold, temperature)
            task = action_task_loss(head, out.actions, out.action_logits, actions)
            teacher = action_task_loss(head, out.actions, out.action_logits, targets.action, "teacher_action")
            loss, parts = shallow_loss(task.loss, teacher.loss, sem_s.float(), targets.sem,
                                       self.distill.student.cfg.static_layers or (), self.weights)
        elif self.settings.objective == "action_regression":
            out = self.distill.student(images, instructions, proprio, mode=mode, threshold=threshold,
                                       temperature=temperature)
            task = action_task_loss(head, out.actions, out.action_logits, actions)
            teacher = action_task_loss(head, out.actions, out.action_logits, targets.action, "teacher_action")
            used = budget_gates(out.gates, gate, threshold, out.executed if topk else None).float()
            loss, parts = regression_loss(task.loss, teacher.loss, used, self.weights)
        else:
            out, sem_s, act_s = self.distill(images, instructions, proprio, mode, threshold, temperature)
            task = action_task_loss(head, out.actions, out.action_logits, actions)
            used = budget_gates(out.gates, gate, threshold, out.executed if topk else None).float()
            loss, parts = distill_loss(task.loss, actions, sem_s.float(), act_s.float(), targets.sem, targets.act,
                                       used, self.weights)
        if "clipped_action_values" in task.parts:   # a tokens head: expert values outside the bins' range
            parts["clipped_action_values"] = task.parts["clipped_action_values"]
        return loss, parts, (out.executed if topk else (out.gates >= threshold).float()).mean()

    def topk_at(self, step: int) -> bool:
        """Whether this optimizer step is in router.topk_phase (the last fraction of the steps)."""
        phase = self.router_cfg.topk_phase
        if not phase or self.settings.family != "routed":
            return False
        return step >= round((1.0 - phase) * self.settings.train.steps)

    def temperature(self, step: int) -> float:
        """The gate temperature at this optimizer step: annealed 1 -> router.anneal_to, else 1."""
        if self.router_cfg.gate != "annealed":
            return 1.0
        return anneal_temperature(step, self.settings.train.steps, self.router_cfg.anneal_to)


def teacher_targets(batch: dict[str, np.ndarray], teacher_hash: str, layers: int) -> TeacherTargets:
    """Cached teacher targets of this batch, refusing another teacher's labels."""
    hashes = set(np.asarray(batch["teacher_hash"]).astype(str).tolist())
    if hashes != {teacher_hash}:
        raise ValueError(f"labelled rows were made by teacher(s) {sorted(hashes)}, but distillation uses "
                         f"teacher {teacher_hash}; re-run `actdistill probe-teacher` for this teacher")
    batch_size = len(batch["teacher_hash"])
    sem = torch.as_tensor(np.asarray(batch["teacher_sem"], dtype=np.float32)).view(batch_size, layers, -1)
    act = torch.as_tensor(np.asarray(batch["teacher_act"], dtype=np.float32)).view(batch_size, layers, -1)
    action = torch.as_tensor(np.asarray(batch["teacher_action"], dtype=np.float32)).view(batch_size, -1)
    return TeacherTargets(sem.transpose(0, 1), act.transpose(0, 1), action)
