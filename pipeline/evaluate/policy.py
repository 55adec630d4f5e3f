"""A loaded policy for closed-loop use: raw image, instruction and proprioception in, actions out."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from pipeline.data.batches import Normalizer
from pipeline.models.checkpoint import load_policy


class PolicyStep(NamedTuple):
    actions: np.ndarray              # B x A, raw units
    executed: np.ndarray             # B x L, 1 where the decoder layer ran for that row
    gates: np.ndarray | None = None  # B x L, a routed student's gate values (a layer runs iff gate >= threshold)


class Policy:
    """Teacher (no router: every layer runs) or routed student (hard gates: skipped layers cost nothing)."""

    def __init__(self, uri: str, device: str = "cpu") -> None:
        """`device`: the torch device the model runs on ("cuda": this process's current GPU); every call takes
        numpy in and gives numpy back on the CPU whatever the device."""
        self.device = torch.device(device)
        self.model, self.card = load_policy(uri)
        self.model.to(self.device)
        self.normalizer = Normalizer.from_dict(self.card.normalizer)
        # A teacher's card has no threshold: it runs every layer, so the value is never used.
        self.threshold = self.card.threshold if self.card.threshold is not None else 0.5
        self.routed = self.model.router is not None
        # A teacher runs every layer; a routed student runs only the layers its gates open.
        self.mode = "hard" if self.routed else "off"

    @property
    def num_layers(self) -> int:
        return self.model.cfg.num_layers

    def act(self, images: np.ndarray, instructions: list[str], proprio: np.ndarray) -> np.ndarray:
        """images B x H x W x 3 uint8, proprio B x P (raw units) -> actions B x A (raw units)."""
        return self.step(images, instructions, proprio).actions

    @torch.no_grad()
    def step(self, images: np.ndarray, instructions: list[str], proprio: np.ndarray) -> PolicyStep:
        """Actions and the layers each row ran. Nothing of the call is kept on the policy: threads may share it.

        Rows are independent: a routed student runs each layer only on the rows whose gate opened it,
        so a batch across environments costs what its rows' layers cost."""
        # .to is a no-op on cpu (Tensor.to, not pipeline.train.device.move: serving imports this module, not Ray).
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2) / 255.0
        x = x.to(self.device)
        # A copy (4 floats): arrays from the Ray object store or a request are read-only, which torch warns about.
        p = self.normalizer.norm_proprio(torch.from_numpy(np.array(proprio, dtype=np.float32)).to(self.device))
        out = self.model(x, list(instructions), p, mode=self.mode, threshold=self.threshold)
        # .cpu() returns the same tensor on cpu, so the CPU path gives what it always gave.
        gates = out.gates.float().cpu().numpy() if out.gates is not None and self.routed else None
        return PolicyStep(self.normalizer.denorm_action(out.actions).cpu().numpy(), out.executed.cpu().numpy(), gates)
