"""Connect to Ray: a local instance by default, a cluster when run.ray_address (or RAY_ADDRESS) is set."""

from __future__ import annotations

import logging
import os

import ray

from pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

# Worker processes must not JIT-compile DeepSpeed's shm all-reduce op (~50 s on a fresh machine;
# training uses gloo) and must render Meta-World on the CPU.
WORKER_ENV = {"DS_ACCELERATOR": "cpu", "MUJOCO_GL": "egl", "TOKENIZERS_PARALLELISM": "false"}


def is_local(cfg: PipelineConfig) -> bool:
    """True when this process runs its own Ray instance (no cluster address anywhere)."""
    return not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS"))


def start_ray(cfg: PipelineConfig) -> None:
    """Idempotent: jobs run one after another in `actdistill run` share one Ray session."""
    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": WORKER_ENV}
    if not is_local(cfg):
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.run.ray_num_cpus, runtime_env=runtime_env, include_dashboard=False,
                 log_to_driver=True)
