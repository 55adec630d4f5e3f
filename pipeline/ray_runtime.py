"""Connect to Ray: a Ray instance of this job's own by default, a cluster when run.ray_address (or
RAY_ADDRESS) names one."""

from __future__ import annotations

import logging
import os
import socket

import ray

from pipeline.config import PipelineConfig
from pipeline.data.ingest import quiet_ray_data
from pipeline.train.device import BASE_WORKER_ENV, worker_env

log = logging.getLogger(__name__)

# Every worker's env vars whatever the device (submitted jobs carry them too); start_ray adds
# DS_ACCELERATOR=cpu on a CPU run (pipeline/train/device.py worker_env).
WORKER_ENV = BASE_WORKER_ENV

# Seconds to wait for a named cluster's head to accept a connection; Ray itself retries for minutes.
CONNECT_TIMEOUT_S = 5.0


def cluster_address(cfg: PipelineConfig) -> str | None:
    """The cluster this job must join (run.ray_address, else RAY_ADDRESS), or None for a Ray of its own."""
    return cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or None


def is_local(cfg: PipelineConfig) -> bool:
    """True when this process runs its own Ray instance (no cluster address anywhere)."""
    return cluster_address(cfg) is None


def init_address(address: str | None) -> str:
    """What ray.init gets. Without an address Ray would join the cluster `ray start` last recorded under its
    temp folder, live or dead (a head started by hand for another purpose, or one that died without
    `ray stop`): "local" always starts a Ray instance of this process's own."""
    return address or "local"


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, naming the address, when nothing answers where the config says a cluster is."""
    if address == "auto":   # Ray resolves it from its own record and says so when there is none
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} (run.ray_address or RAY_ADDRESS) is not HOST:PORT; use the "
                         f"head's GCS address (e.g. 10.0.0.5:6379) or ray://HOST:10001 for Ray Client")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(
            f"no Ray cluster answers at {address} (run.ray_address or RAY_ADDRESS) within {timeout:g} s: {exc}. "
            f"Start one there (`ray start --head --port {port}`, or `actdistill stack up` for a local stack), "
            f"point run.ray_address at a live head, or leave both unset to run on a Ray instance of this "
            f"job's own") from None


def start_ray(cfg: PipelineConfig) -> None:
    """Idempotent: jobs run one after another in `actdistill run` share one Ray session."""
    quiet_ray_data(cfg.run.verbose)
    if ray.is_initialized():
        return
    # Workers render Meta-World on the CPU; DS_ACCELERATOR=cpu only on a CPU run (a local cuda run without a
    # GPU fails here, before Ray starts).
    runtime_env = {"env_vars": worker_env(cfg, local=cluster_address(cfg) is None)}
    # Ray's workers (Train controller, Data coordinators) log ~20 INFO/WARNING lines a fit, repeated each
    # few seconds ("PlacementGroupCleaner ... State API"); errors still reach the terminal.
    logging_config = ray.LoggingConfig(log_level="INFO" if cfg.run.verbose else "ERROR")
    address = cluster_address(cfg)
    # ray.init applies logging_config to this process's root logger too: keep the job's own INFO lines
    # (`=== distill ===`, where the policy was written) as the CLI set them up.
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    if address is not None:
        check_reachable(address)
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_config=logging_config)
    else:
        ray.init(address=init_address(None), num_cpus=cfg.run.ray_num_cpus, runtime_env=runtime_env,
                 include_dashboard=False, log_to_driver=True, logging_config=logging_config)
    root.handlers[:] = handlers
    root.setLevel(level)
    if address is None:   # Ray's own "Started a local Ray instance" is below the quiet log level: say it here
        log.info("started a local Ray instance (GCS %s, %s logical CPUs)", ray.get_runtime_context().gcs_address,
                 cfg.run.ray_num_cpus)
