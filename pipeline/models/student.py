"""Derive a routed student from a teacher (same weights + a new router) and pair it with the probes."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.graph import ProbeSet
from pipeline.models.vla import VLA, VLAConfig, VLAOutput


def student_config(teacher: VLAConfig, router_hidden: int, static_layers: tuple[int, ...] | None = None,
                   keep: int | None = None, pinned: list[int] | tuple[int, ...] | None = None) -> VLAConfig:
    """The teacher's architecture with a router of width `router_hidden` (keep given: at inference it runs its
    `keep` largest gates on every call; pinned given: those layers on every call), or, static_layers given, a fixed
    subset."""
    update = ({"router_hidden": None, "static_layers": tuple(static_layers)} if static_layers
              else {"router_hidden": router_hidden, "router_keep": keep,
                    "router_pinned": tuple(pinned) if pinned else None})
    return teacher.model_copy(update=update)


def derive_student(teacher: VLA, router_hidden: int, static_layers: tuple[int, ...] | None = None,
                   keep: int | None = None) -> VLA:
    """A copy of the teacher's weights with a router (deployed top-k given keep; or, static_layers given, a fixed
    layer subset); with the router forced open it is the teacher."""
    student = VLA(student_config(teacher.cfg, router_hidden, static_layers, keep))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("router.") for k in missing):
        raise RuntimeError(f"teacher and student disagree beyond the router: missing={missing} "
                           f"unexpected={unexpected}")
    return student


class DistillModule(nn.Module):
    """What stage 2 trains: the student and the stage-1 probes. Only `.student` is exported."""

    def __init__(self, student: VLA, probes: ProbeSet) -> None:
        super().__init__()
        self.student = student
        self.probes = probes

    def forward(self, images: torch.Tensor, instructions: list[str], proprio: torch.Tensor,
                mode: str, threshold: float, temperature: float = 1.0
                ) -> tuple[VLAOutput, torch.Tensor, torch.Tensor]:
        """The student's output (actions, gates, a tokens head's logits) and its per-layer semantics and actions."""
        out = self.student(images, instructions, proprio, mode=mode, threshold=threshold, record=True,
                           temperature=temperature)
        sem, act = self.probes(out.hidden, out.token_mask)
        return out, sem, act
