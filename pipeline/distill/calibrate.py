"""Calibrating a routed student's gate threshold on its own closed-loop calls, so that it runs router.budget of
its layers where it is deployed, not only on the training rows.

Why: a router trained to a budget on the experts' frames opens more layers on the student's own trajectories
(demo students ran 0.40 of the layers in training and up to 0.48 in closed loop). The gates are a monotone score
per layer and call, so the threshold at which a fraction rho of them open is their (1 - rho) quantile. The
trajectories change with the threshold, so it is estimated again on the calls the new threshold makes.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
from pydantic import BaseModel

from pipeline.config import PipelineConfig
from pipeline.data import storage
from pipeline.evaluate.rollout import EpisodeResult, run_closed_loop
from pipeline.models.checkpoint import CONFIG, read_policy_config
from pipeline.train.device import resolve_device

log = logging.getLogger(__name__)

# Calibration episodes use evaluate.seed + SEED_OFFSET + i: never an evaluation seed (evaluate.seed + i, i < 50k),
# never a collect seed (collect.seed + i, small).
SEED_OFFSET = 50_000
ROUNDS = 2          # threshold estimates; each is measured again on the calls it makes (3 rollouts in all)
EDGE = 1e-6         # the threshold stays inside (0, 1), as router.threshold must


class Calibration(BaseModel):
    """What calibration did, kept in the student's config.json and logged to MLflow."""

    budget: float
    threshold_trained: float          # router.threshold, what training's hard gates used
    threshold: float                  # the calibrated threshold the student now runs with
    fraction_trained_threshold: float  # executed fraction in closed loop at the trained threshold
    fraction: float                   # executed fraction in closed loop at the calibrated threshold
    episodes: int                     # closed-loop episodes per rollout (tasks x calibrate_episodes)
    calls: int                        # policy calls behind `fraction`
    seeds: tuple[int, int]            # first and last calibration seed


def threshold_for(gates: np.ndarray, budget: float) -> float:
    """The threshold at which a fraction `budget` of these gate values (calls x L) is >= it: their (1 - budget)
    quantile, taken as a value in the data so ties at saturated gates (0.0 or 1.0) stay on the right side."""
    flat = np.sort(gates.astype(np.float64).ravel())
    keep = int(round(budget * flat.size))
    if keep <= 0:
        return float(min(1.0 - EDGE, np.nextafter(flat[-1], np.inf)))
    return float(np.clip(flat[flat.size - keep], EDGE, 1.0 - EDGE))


def executed_fraction(gates: np.ndarray, threshold: float) -> float:
    return float((gates >= threshold).mean())


def _gates(results: list[EpisodeResult]) -> np.ndarray:
    missing = [f"{r.task}/{r.seed}" for r in results if r.gates is None]
    if missing:
        raise RuntimeError(f"closed-loop episodes {missing[:3]} recorded no gates: only a routed student calibrates")
    return np.concatenate([r.gates for r in results])


def write_threshold(uri: str, threshold: float, calibration: Calibration | None = None) -> None:
    """The student's config.json with a new inference threshold (the weights, and so its hash, are unchanged)."""
    card = read_policy_config(uri)
    extra = {"calibration": calibration.model_dump(mode="json")} if calibration else {}
    updated = card.model_copy(update={"threshold": threshold, **extra})
    storage.write_bytes(storage.join(uri, CONFIG), updated.model_dump_json(indent=2, exclude_none=True).encode())


def calibrate_student(cfg: PipelineConfig, uri: str) -> Calibration:
    """Run the routed student at `uri` in closed loop on calibration seeds, set its threshold to the gates'
    (1 - router.budget) quantile, ROUNDS times, and measure the result on the calls the final threshold makes."""
    seeds = [cfg.evaluate.seed + SEED_OFFSET + i for i in range(cfg.router.calibrate_episodes)]
    device = resolve_device(cfg)
    budget, trained = cfg.router.budget, read_policy_config(uri).threshold or cfg.router.threshold

    def rollout() -> np.ndarray:
        return _gates(run_closed_loop({"student": uri}, cfg.collect.tasks, seeds, cfg.collect.image_size,
                                      cfg.collect.camera, cfg.evaluate.max_steps, cfg.evaluate.num_workers,
                                      cfg.evaluate.envs_per_worker, device))

    gates = rollout()
    at_trained = executed_fraction(gates, trained)
    threshold = trained
    for round_ in range(ROUNDS):
        threshold = threshold_for(gates, budget)
        write_threshold(uri, threshold)
        gates = rollout()
        log.info("calibration round %d: threshold %.4f runs %.3f of the layers in closed loop (budget %.3f)",
                 round_ + 1, threshold, executed_fraction(gates, threshold), budget)
    result = Calibration(budget=budget, threshold_trained=trained, threshold=threshold,
                         fraction_trained_threshold=at_trained, fraction=executed_fraction(gates, threshold),
                         episodes=len(seeds) * len(cfg.collect.tasks), calls=int(gates.shape[0]),
                         seeds=(seeds[0], seeds[-1]))
    write_threshold(uri, threshold, result)
    return result


def calibrated(cfg: PipelineConfig, uri: str) -> Calibration | None:
    """Calibrate a routed student when router.calibrate_episodes > 0 (a static or shallow student runs a fixed
    set of layers: nothing to calibrate), logging the figures to the active MLflow run."""
    if not cfg.router.calibrate_episodes or cfg.distill.family != "routed":
        return None
    result = calibrate_student(cfg, uri)
    mlflow.log_metrics({"calibration/threshold": result.threshold,
                        "calibration/fraction_trained_threshold": result.fraction_trained_threshold,
                        "calibration/fraction": result.fraction})
    log.info("calibrated threshold %.4f (trained %.2f): %.3f of the layers in closed loop, %.3f before "
             "(budget %.3f, %d calls)", result.threshold, result.threshold_trained, result.fraction,
             result.fraction_trained_threshold, result.budget, result.calls)
    return result
