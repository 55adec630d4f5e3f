"""Model registry: the promotion gate, version tags as evidence, and the challenger/champion aliases."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.models.checkpoint import read_policy_config
from pipeline.tracking.metrics import redacted
from pipeline.tracking.pyfunc import POLICY_ARTIFACT, input_example, policy_signature
from pipeline.tune.trials import TrialResult

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
PYFUNC_ENTRY = Path(__file__).with_name("pyfunc_entry.py")


@dataclass(frozen=True)
class Gate:
    teacher_success: float
    success_delta: float
    compute_budget: float

    def passes(self, candidate: TrialResult) -> bool:
        return (candidate.success >= self.teacher_success - self.success_delta
                and candidate.compute_ratio <= self.compute_budget)


@dataclass(frozen=True)
class Registration:
    """What promote did: the version these weights are, and where the aliases point now."""

    name: str
    version: str
    challenger: str
    champion: str


# The families from simplest to serve to most involved (a dense stack, a fixed subset, a router): the tie-break when
# promote.prefer=compute finds students of equal compute.
FAMILY_ORDER = {"shallow": 0, "static": 1, "routed": 2}


def rank_key(success: float, compute_ratio: float, action_mse_norm: float, family: str = "routed",
             prefer: str = "success") -> tuple[float, ...]:
    """prefer=success: higher success first, then less compute, then lower held-out action error.
    prefer=compute: less compute first, then the simpler family, then higher success and lower error."""
    if prefer == "compute":
        return (compute_ratio, FAMILY_ORDER.get(family, len(FAMILY_ORDER)), -success, action_mse_norm)
    return (-success, compute_ratio, action_mse_norm)


def _candidate_key(candidate: TrialResult, prefer: str) -> tuple[float, ...]:
    return rank_key(candidate.success, candidate.compute_ratio, candidate.action_mse_norm, candidate.family, prefer)


def ranked_passing(candidates: list[TrialResult], gate: Gate, prefer: str = "success") -> list[TrialResult]:
    """The candidates that pass the gate on their own figures, best first by promote.prefer."""
    return sorted((c for c in candidates if gate.passes(c)), key=lambda c: _candidate_key(c, prefer))


def _alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def find_version(client: MlflowClient, name: str, student_hash: str, strict: bool = False) -> Any | None:
    """The version already registered for these exact weights, if any (promote is idempotent). strict: a
    failed search raises instead of reading as "none" (an unreachable server must not cause a second version)."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        if strict:
            raise
        return None
    for v in versions:
        if v.tags.get("student_hash") == student_hash:
            return v
    return None


def register_student(name: str, candidate: TrialResult, evidence: dict[str, str]) -> Any:
    """Log the student as a pyfunc in the active run and register it, the version created with its evidence tags
    in one request: no version ever exists without them (find_version, and so promote's idempotency, reads the
    student_hash tag)."""
    # Models-from-code: MLflow stores the entry file, not a cloudpickled object. The signature and example
    # show the MLflow UI and `mlflow models serve` users what to send (MLflow also runs the example once).
    card = read_policy_config(candidate.student_uri)
    info = mlflow.pyfunc.log_model(name="student", python_model=str(PYFUNC_ENTRY),
                                   artifacts={POLICY_ARTIFACT: candidate.student_uri},
                                   signature=policy_signature(card), input_example=input_example(card),
                                   pip_requirements=["actdistill"])
    version = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in evidence.items()})
    return MlflowClient().get_model_version(name, version.version)


def find_or_register(name: str, candidate: TrialResult, evidence: dict[str, str], limit_s: float,
                     retry_s: float = 5.0) -> Any:
    """The version of these weights: found, or registered. Each MLflow request already retries with backoff; a
    step that still fails (the tracking server away) is tried again, looking for the version first, since a
    request may have reached the server before the connection dropped. Past `limit_s` (tracking.outage_limit_s)
    the error names the tracking URI."""
    started = time.monotonic()
    while True:
        try:
            found = find_version(MlflowClient(), name, evidence["student_hash"], strict=True)
            if found is not None:
                log.info("these weights are already version %s; not registering again", found.version)
                return found
            return register_student(name, candidate, evidence)
        except MlflowException as exc:
            waited = time.monotonic() - started
            uri = mlflow.get_tracking_uri()
            if waited > limit_s:
                raise RuntimeError(f"could not register {name} at the MLflow tracking server {redacted(uri, uri)} "
                                   f"for {waited:.0f} s (tracking.outage_limit_s={limit_s:g}): "
                                   f"{redacted(str(exc)[:300], uri)}; nothing was half registered, run promote "
                                   f"again once the server answers") from exc
            log.warning("registering %s failed (%s); trying again in %.0f s", name, type(exc).__name__, retry_s)
            time.sleep(retry_s)


def beats(challenger: Any, champion: Any | None, prefer: str = "success") -> bool:
    if champion is None:
        return True
    return _version_key(challenger, prefer) < _version_key(champion, prefer)


def _version_key(version: Any, prefer: str) -> tuple[float, ...]:
    """The rank of a registered version, from the evidence tags it was registered with (versions registered
    before the family tag existed were routed students)."""
    figures = (float(version.tags[k]) for k in ("success", "compute_ratio", "action_mse_norm"))
    return rank_key(*figures, family=version.tags.get("family", "routed"), prefer=prefer)


def set_aliases(name: str, version: Any, prefer: str = "success") -> Registration:
    """challenger -> this version; champion moves only if it beats the current champion."""
    client = MlflowClient()
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    champion = _alias_version(client, name, CHAMPION)
    if champion is None or (champion.version != version.version and beats(version, champion, prefer)):
        client.set_registered_model_alias(name, CHAMPION, version.version)
        log.info("version %s of %s is now %s", version.version, name, CHAMPION)
    final = _alias_version(client, name, CHAMPION)
    return Registration(name=name, version=str(version.version), challenger=str(version.version),
                        champion=str(final.version) if final else "")
