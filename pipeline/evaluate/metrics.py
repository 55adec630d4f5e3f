"""Offline metrics and statistics: Wilson intervals and held-out action error."""

from __future__ import annotations

import math

import ray.data
import torch

from pipeline.data.batches import to_model_batch
from pipeline.evaluate.policy import Policy
from pipeline.train.device import move


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a success rate (sane at 0 and n successes, unlike the normal one)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def action_error(policy: Policy, data: ray.data.Dataset, image_shape: tuple[int, int, int],
                 batch_size: int = 64) -> dict[str, float]:
    """MSE against expert actions on held-out rows, in normalised units and in raw action units, computed on
    the policy's device."""
    norm_sq, raw_sq, rows = 0.0, 0.0, 0
    for batch in data.iter_batches(batch_size=batch_size, batch_format="numpy"):
        b = move(to_model_batch(batch, policy.normalizer, image_shape), policy.device)   # a no-op on cpu
        out = policy.model(b["images"], b["instructions"], b["proprio"], mode=policy.mode,
                           threshold=policy.threshold)
        diff = out.actions - b["actions"]
        norm_sq += float((diff ** 2).sum())
        raw = policy.normalizer.denorm_action(out.actions) - policy.normalizer.denorm_action(b["actions"])
        raw_sq += float((raw ** 2).sum())
        rows += diff.shape[0]
    if rows == 0:
        raise ValueError("no held-out rows to measure action error on; set data.val_fraction > 0 "
                         "and collect at least 2 episodes")
    dims = policy.normalizer.action_dim
    return {"action_mse_norm": norm_sq / (rows * dims), "action_mse_raw": raw_sq / (rows * dims),
            "heldout_rows": float(rows)}
