"""Failures a user can fix (bad config, bad or missing input, unreachable storage): the CLI prints their
message alone; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A failure whose message names the file, key or value at fault and the fix; no traceback needed."""


class MissingInput(UserError, FileNotFoundError):
    """A stage's input is not there (e.g. distill before train-teacher); the message names the stage to run."""


class BadInput(UserError, ValueError):
    """An input file that cannot be used as it is (unreadable Parquet, invalid manifest, missing columns)."""


class StaleInput(UserError, ValueError):
    """An input made from something else (labels of another teacher); the message names the stage to re-run."""


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`, unwrapping what Ray wraps it in: RayTaskError (`.cause`), Ray Train's
    WorkerGroupError (`.worker_failures`) and ControllerError (`.controller_failure`), and chained causes.
    None when the failure is not a known user error (then it is a bug and the traceback is wanted)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        todo.extend(_wrapped(current))
    return None


def _wrapped(exc: BaseException) -> list[BaseException]:
    inner = [getattr(exc, "cause", None), getattr(exc, "controller_failure", None), exc.__cause__, exc.__context__]
    inner += list((getattr(exc, "worker_failures", None) or {}).values())
    inner += list(getattr(exc, "exceptions", ()))   # ExceptionGroup
    return [e for e in inner if isinstance(e, BaseException)]
