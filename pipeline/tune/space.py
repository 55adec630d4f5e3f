"""Search spaces in YAML keyed by the configs' dotted paths, turned into Ray Tune domains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from ray import tune

from pipeline.config import ConfigError, PipelineConfig, with_overrides

# kind -> (how to build the Tune domain, what a valid spec looks like)
KINDS: dict[str, tuple[Any, str]] = {
    "grid": (tune.grid_search, "grid: [0.3, 0.5, 0.7]"),
    "choice": (tune.choice, "choice: [1.0, 2.0]"),
    "uniform": (lambda v: tune.uniform(*v), "uniform: [0.3, 0.8]"),
    "loguniform": (lambda v: tune.loguniform(*v), "loguniform: [1.0e-4, 1.0e-2]"),
}


def _domain(key: str, spec: Any) -> tuple[Any, list[Any]]:
    """(Tune domain, sample values to validate against the config)."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        examples = "; ".join(f"{key}: {{{e}}}" for _, e in KINDS.values())
        raise ConfigError(f"{key}: {spec!r} is not a search dimension; write one of: {examples}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values or (kind in ("uniform", "loguniform") and len(values) != 2):
        raise ConfigError(f"{key}: {kind} needs {KINDS[kind][1]!r}, got {values!r}")
    return KINDS[kind][0](values), list(values)


def load_space(path: str | Path, base: PipelineConfig) -> dict[str, Any]:
    """The Tune param space; every key and bound is validated against the config before any trial."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space {p} does not exist; pass e.g. --space tune_spaces/smoke.yaml")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{p}: expected a mapping of dotted keys to dimensions, e.g. router.budget: {{grid: [0.3, 0.6]}}")
    space, problems = {}, []
    for key, spec in raw.items():
        try:
            space[key], samples = _domain(key, spec)
            for value in samples:
                with_overrides(base, {key: value})
        except ConfigError as exc:
            problems.append(str(exc).replace("<sweep trial>: ", ""))
    if problems:
        raise ConfigError(f"{p}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return space
