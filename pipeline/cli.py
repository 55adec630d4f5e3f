"""Command line: `actdistill VERB --config FILE [dotted.key=value ...]` and `python -m jobs.VERB ...`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.data import storage
from pipeline.errors import MissingInput, find_user_error
from pipeline.stages import BY_NAME, STAGES, RunPaths, upstream

# verb -> module under jobs/ (each has `main(cfg: PipelineConfig)`): every stage, and `run` for all of them
VERBS: dict[str, str] = {**{stage.name: stage.job for stage in STAGES}, "run": "run"}

# Commands that are not Ray jobs: name -> module with `main(argv: list[str]) -> int`.
TOOLS: dict[str, str] = {
    "import-lerobot": "pipeline.data.lerobot",
    "stack": "pipeline.infra.stack",
    "submit": "pipeline.infra.submit",
    "plan": "pipeline.plan",
}


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="ActDistill pipeline job")
    p.add_argument("--config", required=True, help="YAML config, e.g. jobs/configs/smoke.yaml")
    p.add_argument("--space", help="sweep only: a search space YAML (same as sweep.space=FILE)")
    p.add_argument("--resume", metavar="RUN_NAME",
                   help="train-teacher/distill only: continue the interrupted Ray Train run RUN_NAME from its "
                        "last checkpoint (same as run.resume=RUN_NAME); pass the run's config and overrides")
    p.add_argument("--verbose", action="store_true",
                   help="Ray Data's progress bars and Ray's worker logs too (same as run.verbose=true)")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of a known error (a bad config, shard or input) too")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as router.budget=0.4")
    return p


# Only these jobs are one Ray Train run that a checkpoint can continue.
RESUMABLE = tuple(stage.name for stage in STAGES if stage.resumable)


def _resolve(args: argparse.Namespace, verb: str) -> PipelineConfig:
    overrides = list(args.overrides)
    if args.space:
        overrides.append(f"sweep.space={args.space}")
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    if args.verbose:
        overrides.append("run.verbose=true")
    cfg = load_config(args.config, overrides)
    if cfg.run.resume and verb not in RESUMABLE:
        raise ConfigError(f"run.resume={cfg.run.resume!r}: only {' and '.join(RESUMABLE)} runs can be resumed, "
                          f"not {verb}; run `actdistill {RESUMABLE[-1]} --resume {cfg.run.resume} ...` instead")
    return cfg


def check_inputs(cfg: PipelineConfig, verb: str) -> None:
    """Before any Ray or MLflow work: the stages before `verb`'s own inputs have run (the first missing one is
    named). Its direct inputs the job checks itself, with what it really reads (online distill reads
    probe-teacher's probes but not its labels.json, so that stage's completion mark cannot be required)."""
    if cfg.model.pretrained_vlm and verb in ("train-teacher", "run"):
        _check_vlm_folder(cfg, collecting=verb == "run" and cfg.data.shards_uri is None)
    if verb not in BY_NAME:
        return
    paths = RunPaths.of(cfg)
    direct = set(BY_NAME[verb].after)
    for name in (up for up in upstream(verb) if up not in direct):
        done = BY_NAME[name].done_file(paths)
        if done is not None and not storage.exists(done):
            raise MissingInput(f"{verb} needs the output of {name}, but {done} does not exist; run "
                               f"`actdistill {name} --config FILE` with this config first (or `actdistill run`)")


def _check_vlm_folder(cfg: PipelineConfig, collecting: bool) -> None:
    """model.pretrained_vlm is a folder of a supported family (the message lists them), its vocabulary holds a tokens
    head's bins and, when this run collects the shards, its processor takes frames of collect.image_size."""
    from pipeline.models.vlm_backbone import read_vlm_spec, vlm_dims
    from pipeline.models.vlm_import import check_image_compatibility, read_vlm_config

    uri = cfg.model.pretrained_vlm
    try:
        read_vlm_config(uri)
        if cfg.model.action_head == "tokens":
            vocab = vlm_dims(read_vlm_spec(uri))["vocab_size"]
            if vocab < cfg.model.action_bins:
                raise ValueError(f"model.action_bins={cfg.model.action_bins} exceeds its vocabulary ({vocab} tokens): "
                                 f"the bins start from its last action_bins token rows; set model.action_bins to at "
                                 f"most {vocab}")
        if collecting:
            size = cfg.collect.image_size
            check_image_compatibility(read_vlm_spec(uri), (size, size, 3))
    except (ValueError, OSError) as exc:
        if isinstance(exc, MissingInput):
            raise
        raise ConfigError(f"model.pretrained_vlm={uri}: {exc}") from None


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def run_cli(job_main: Callable[[PipelineConfig], Any], verb: str, argv: list[str] | None = None) -> int:
    """Entry point of `python -m jobs.<verb>`: the config is validated before any Ray work."""
    _setup_logging()
    args = _parser(f"python -m jobs.{VERBS.get(verb, verb)}").parse_args(argv)
    try:
        cfg = _resolve(args, verb)
        check_inputs(cfg, verb)
        job_main(cfg)
    except Exception as exc:
        known = find_user_error(exc)
        if known is None or args.debug:
            raise   # a bug, or --debug: the traceback says where
        # One message (it names the file or key and the fix); Ray's wrappers around it add nothing.
        print(f"error: {known} [--debug shows the traceback]", file=sys.stderr)
        return 2 if isinstance(known, ConfigError) else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `actdistill` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        _setup_logging()
        return int(importlib.import_module(TOOLS[argv[0]]).main(argv[1:]))
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        bad = f"unknown command {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        print(f"{bad}usage: actdistill {{{','.join(VERBS)}}} --config FILE [key=value ...]\n"
              f"       actdistill {{{','.join(TOOLS) or '-'}}} ...", file=sys.stderr)
        return 2 if bad or not argv else 0
    verb = argv[0]
    job = importlib.import_module(f"jobs.{VERBS[verb]}")
    return run_cli(job.main, verb, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
