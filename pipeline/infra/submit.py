"""`actdistill submit VERB --config FILE [key=value ...]`: run a job on a Ray cluster through its job API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
import uuid
from pathlib import Path

from ray.job_submission import JobSubmissionClient

from pipeline.cli import VERBS
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.infra.stack import DEFAULT_DIR, StackError, read_state
from pipeline.ray_runtime import WORKER_ENV

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Uploaded as the job's working_dir (gitignore syntax): outputs, environments and history stay home.
EXCLUDES = ["runs/", ".venv/", "venv/", ".git/", "mlruns/", "bench/results/", "__pycache__/",
            ".pytest_cache/", "*.egg-info/", "*.db"]
# The driver inside the job calls ray.init(runtime_env={"env_vars": WORKER_ENV}) (pipeline/ray_runtime.py);
# Ray refuses to merge that with a job runtime_env setting the same keys unless told the driver wins.
# The values are identical, so letting the driver override changes nothing.
JOB_ENV = {**WORKER_ENV, "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(ValueError):
    """A submission that cannot go ahead; the message names the flag or value and the fix."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="actdistill submit", description="Run a pipeline job on a Ray cluster")
    p.add_argument("verb", choices=list(VERBS), help="the job to run")
    p.add_argument("--config", required=True, help="YAML config inside this project, e.g. jobs/configs/smoke.yaml")
    p.add_argument("--space", help="sweep only: a search space YAML (same as sweep.space=FILE)")
    p.add_argument("--address", help="the cluster's job API, e.g. http://127.0.0.1:8265 "
                                     "(default: RAY_ADDRESS, then the local stack's state file)")
    p.add_argument("--stack-dir", default=DEFAULT_DIR, help=f"local stack state folder (default {DEFAULT_DIR})")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as router.budget=0.4")
    return p


def project_relative(config: str) -> str:
    """The config's path inside the project, which is where the job finds it in its working_dir."""
    path = Path(config).resolve()
    if not path.is_file():
        raise SubmitError(f"--config={config}: no such file; e.g. --config jobs/configs/smoke.yaml")
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        raise SubmitError(f"--config={config} is outside the project folder {REPO_ROOT}, which is what the job "
                          f"receives; copy it under {REPO_ROOT / 'jobs' / 'configs'}") from None


def resolve_address(flag: str | None, stack_dir: str) -> str:
    """--address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else the local stack's job API."""
    address = flag or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        try:
            state = read_state(stack_dir)
        except StackError:
            raise SubmitError(f"no cluster address: pass --address http://HEAD:8265, set RAY_ADDRESS, or start "
                              f"a local stack with `actdistill stack up` (no state in {stack_dir})") from None
        address = str(state["services"]["ray"]["dashboard_url"])
        if state["env"].get("RAY_AUTH_MODE") == "token" and "RAY_AUTH_MODE" not in os.environ:
            use_token_auth()
    # Ray's client lets these variables override its address argument; make them agree with our choice.
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    return address


def use_token_auth() -> None:
    """Send Ray's auth token (Ray reads it from ~/.ray/auth_token or RAY_AUTH_TOKEN) with every request."""
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # Ray caches the mode at import; `ray start` refreshes it the same way


def entrypoint(verb: str, config: str, overrides: list[str]) -> str:
    return shlex.join(["python", "-m", f"jobs.{VERBS[verb]}", "--config", config, *overrides])


def _warn_local_paths(cfg: PipelineConfig) -> None:
    if not Path(cfg.run.run_dir).is_absolute():
        log.warning("run.run_dir=%s is relative: on the cluster it lands inside the job's temporary working "
                    "directory; pass an absolute path on shared storage, e.g. run.run_dir=/mnt/runs/smoke",
                    cfg.run.run_dir)


def submit(client: JobSubmissionClient, verb: str, config: str, overrides: list[str],
           cfg: PipelineConfig) -> str:
    """Hand the job to the cluster with this project as its working directory; returns the job id."""
    return client.submit_job(
        entrypoint=entrypoint(verb, config, overrides),
        submission_id=f"actdistill-{verb}-{uuid.uuid4().hex[:8]}",
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": EXCLUDES, "env_vars": JOB_ENV},
        metadata={"verb": verb, "config": config, "config_digest": cfg.digest()},
    )


async def _stream_logs(client: JobSubmissionClient, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def follow(client: JobSubmissionClient, job_id: str, poll_s: float = 1.0) -> str:
    """Print the job's logs until it ends; returns its final status (SUCCEEDED, FAILED or STOPPED)."""
    asyncio.run(_stream_logs(client, job_id))
    # The log stream closes as the job ends; the status may take a moment to follow.
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    return status


def run(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *([f"sweep.space={args.space}"] if args.space else [])]
    config = project_relative(args.config)
    cfg = load_config(str(REPO_ROOT / config), overrides)  # fail here, not minutes later on the cluster
    _warn_local_paths(cfg)
    address = resolve_address(args.address, args.stack_dir)
    client = JobSubmissionClient(address)
    job_id = submit(client, args.verb, config, overrides, cfg)
    print(f"submitted {job_id} to {address}", flush=True)
    if args.no_wait:
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Stop it with: ray job stop --address {address} "
              f"{job_id}", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED" and info.message else ""))
    return 0 if status == "SUCCEEDED" else 1


def main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        return run(args)
    except (ConfigError, SubmitError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
