"""Expert data collection: scripted Meta-World episodes run as Ray tasks, one CPU each."""

from __future__ import annotations

import logging

import ray
from tqdm import tqdm

from pipeline.config import CollectSection
from pipeline.sim.metaworld_env import Episode, run_expert_episode

log = logging.getLogger(__name__)


def episode_keys(cfg: CollectSection) -> list[tuple[str, int]]:
    """(task, seed) in the order episodes are stored: task order of the config, then seed."""
    return [(task, cfg.seed + i) for task in cfg.tasks for i in range(cfg.episodes_per_task)]


def _run_all(cfg: CollectSection, keys: list[tuple[str, int]]) -> list[Episode]:
    """Run every episode as a Ray task; results come back in the order of keys, not of completion."""
    # One CPU per episode: MuJoCo stepping and EGL rendering are single-threaded (~0.9 s/episode).
    remote = ray.remote(num_cpus=1)(run_expert_episode)
    refs = [remote.remote(task, seed, cfg.image_size, cfg.camera, cfg.max_steps, cfg.action_noise)
            for task, seed in keys]
    pending = list(refs)
    with tqdm(total=len(refs), desc="collect", unit="episode") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
    return ray.get(refs)


def collect_episodes(cfg: CollectSection) -> tuple[list[Episode], int]:
    """(episodes kept, number dropped): failed expert episodes are dropped unless cfg.keep_failed."""
    episodes = _run_all(cfg, episode_keys(cfg))
    kept = episodes if cfg.keep_failed else [ep for ep in episodes if ep.success]
    dropped = len(episodes) - len(kept)
    failed = sum(not ep.success for ep in episodes)
    log.info("collected %d episodes: %d succeeded, %d dropped (keep_failed=%s)",
             len(episodes), len(episodes) - failed, dropped, cfg.keep_failed)
    return kept, dropped
