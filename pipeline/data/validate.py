"""Full validation of a shard folder against its manifest: every file, every row, and the content hash."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data import storage
from pipeline.data.manifest import Manifest, manifest_uri
from pipeline.data.shards import REQUIRED_COLUMNS
from pipeline.errors import BadInput

log = logging.getLogger(__name__)

BadRowPolicy = Literal["error", "skip"]
# Shards are read and parsed on a few threads (pyarrow releases the GIL) so S3 latency overlaps;
# at most this many shards (~25 MB each at 2000 rows of 64x64) are in memory at once.
READ_THREADS = 4
_SHOWN = 5  # bad rows quoted in an error or log line; the count covers the rest
_FIX = ("fix or re-create the source data (`actdistill collect`, `actdistill import-lerobot`), or set "
        "data.on_bad_rows=skip to leave such rows out of training (they are counted and logged)")


class ShardError(BadInput):
    """A shard folder that cannot be trained on; the message names the file (and row) and the fix."""


@dataclass(frozen=True)
class BadRow:
    file: str
    row: int  # 0-based row inside the file
    episode_id: str | None
    step: int | None
    reason: str

    def describe(self) -> str:
        return f"{self.file} row {self.row} (episode {self.episode_id}, step {self.step}): {self.reason}"


@dataclass(frozen=True)
class ValidationReport:
    """What validate_shards found; with on_bad_rows=skip, skip_rows goes to open_shards."""

    uri: str
    num_shards: int
    num_rows: int
    bad_rows: tuple[BadRow, ...]

    @property
    def num_bad(self) -> int:
        return len(self.bad_rows)

    @property
    def skip_rows(self) -> frozenset[tuple[str, int]] | None:
        """(episode_id, step) of every bad row, or None when there is nothing to leave out.

        Rows whose key is itself null are not listed; open_shards drops null keys whenever this is set.
        """
        if not self.bad_rows:
            return None
        return frozenset((b.episode_id, b.step) for b in self.bad_rows
                         if b.episode_id is not None and b.step is not None)


@dataclass(frozen=True)
class _Vector:
    column: str
    width: int
    integer: bool  # image bytes are uint8; actions and proprioception are floats


def _vectors(manifest: Manifest) -> tuple[_Vector, ...]:
    return (_Vector("image", int(np.prod(manifest.image_shape)), True),
            _Vector("proprio", manifest.proprio_dim, False),
            _Vector("action", manifest.action_dim, False))


def _load(uri: str, name: str) -> tuple[bytes, pa.Table]:
    """One shard's bytes (for the hash) and its table; unreadable or missing files name the fix."""
    file_uri = storage.join(uri, name)
    try:
        data = storage.read_bytes(file_uri)
    except FileNotFoundError:
        raise ShardError(f"{file_uri} is listed in {manifest_uri(uri)} but missing; restore it or "
                         f"re-create the folder") from None
    try:
        return data, pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{file_uri} is not a readable Parquet file ({len(data)} bytes: {exc}); it was "
                         f"probably truncated by an interrupted copy or upload. Restore the file or "
                         f"re-create the folder") from None


def _check_structure(uri: str, name: str, table: pa.Table, manifest: Manifest) -> None:
    """File-level problems (the file cannot be read as this dataset at all) always raise."""
    file_uri = storage.join(uri, name)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ShardError(f"{file_uri} lacks column(s) {missing}; shards need {list(REQUIRED_COLUMNS)}. "
                         f"Re-create the folder with `actdistill collect` or `actdistill import-lerobot`")
    for vec in _vectors(manifest):
        kind = table.schema.field(vec.column).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
            raise ShardError(f"{file_uri}: column {vec.column!r} has type {kind}; expected a list of "
                             f"{vec.width} {'uint8' if vec.integer else 'float'} values per row")
        value_ok = pa.types.is_uint8(kind.value_type) if vec.integer else pa.types.is_floating(kind.value_type)
        if not value_ok:
            raise ShardError(f"{file_uri}: column {vec.column!r} holds {kind.value_type} values; expected "
                             f"{'uint8 pixels' if vec.integer else 'floats'}")
        if pa.types.is_fixed_size_list(kind) and kind.list_size != vec.width:
            raise ShardError(f"{file_uri}: column {vec.column!r} has {kind.list_size} values per row but "
                             f"{manifest_uri(uri)} says {_expected(vec, manifest)}; one folder holds one "
                             f"image size and one action/proprio size. Re-create the shard or point at "
                             f"the right manifest")


def _expected(vec: _Vector, manifest: Manifest) -> str:
    if vec.column == "image":
        return f"image_shape={manifest.image_shape} (= {vec.width} values)"
    return f"{vec.column}_dim={vec.width}"


def _row_problems(table: pa.Table, manifest: Manifest) -> dict[int, list[str]]:
    """Row index -> reasons: null cells, lists of the wrong length, NaN/inf actions or proprio."""
    problems: dict[int, list[str]] = {}

    def flag(mask: pa.Array | np.ndarray, reason: str) -> None:
        rows = np.flatnonzero(np.asarray(mask, dtype=bool))
        for row in rows.tolist():
            problems.setdefault(row, []).append(reason)

    for column in ("episode_id", "step", "image", "proprio", "action"):
        flag(table[column].is_null().to_numpy(zero_copy_only=False), f"{column} is null")
    for vec in _vectors(manifest):
        col = table[vec.column].combine_chunks()
        if not pa.types.is_fixed_size_list(col.type):
            lengths = pc.fill_null(pc.list_value_length(col), vec.width).to_numpy(zero_copy_only=False)
            for row in np.flatnonzero(lengths != vec.width).tolist():
                problems.setdefault(row, []).append(
                    f"{vec.column} has {lengths[row]} values, expected {_expected(vec, manifest)}")
        if not vec.integer:
            flag(_nonfinite_rows(col, table.num_rows), f"{vec.column} holds NaN, inf or a null value")
    return problems


def _nonfinite_rows(col: pa.Array, num_rows: int) -> np.ndarray:
    """A (rows,) mask of list rows holding any NaN/inf/null element."""
    values = pc.list_flatten(col)
    parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
    bad_values = pc.invert(pc.fill_null(pc.is_finite(values), False)).to_numpy(zero_copy_only=False)
    mask = np.zeros(num_rows, dtype=bool)
    mask[parents[bad_values]] = True
    return mask


def _bad_rows(name: str, table: pa.Table, manifest: Manifest) -> list[BadRow]:
    problems = _row_problems(table, manifest)
    if not problems:
        return []
    rows = sorted(problems)
    ids = table["episode_id"].take(rows).to_pylist()
    steps = table["step"].take(rows).to_pylist()
    return [BadRow(name, row, eid, step, "; ".join(problems[row])) for row, eid, step in zip(rows, ids, steps)]


def _shards_in_order(uri: str, names: list[str]) -> Iterator[tuple[str, bytes, pa.Table]]:
    """(name, bytes, table) in name order, read READ_THREADS at a time."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(names), READ_THREADS):
            window = names[start:start + READ_THREADS]
            for name, (data, table) in zip(window, pool.map(lambda n: _load(uri, n), window)):
                yield name, data, table


def validate_shards(uri: str, manifest: Manifest, on_bad_rows: BadRowPolicy = "error",
                    cache_dir: str | Path | None = None) -> ValidationReport:
    """Check every shard of a folder against its manifest before training reads it.

    Raises ShardError for a missing or unreadable (truncated) file, a missing column, a vector column of
    the wrong fixed size or type, or shards whose bytes do not hash to manifest.content_hash. Bad rows
    (null cells, lists of the wrong length, NaN/inf in actions or proprio) raise naming file and row with
    on_bad_rows="error"; with "skip" they are counted, logged and returned for open_shards to leave out.

    With cache_dir (a run's folder for reports), a folder already validated there is not read again while
    its manifest and every shard's size and modification stamp are unchanged; the policy acts on the stored
    report just as on a fresh one, so every stage raises or logs the same.
    """
    if on_bad_rows not in get_args(BadRowPolicy):
        raise ValueError(f"on_bad_rows={on_bad_rows!r}; choose from {list(get_args(BadRowPolicy))}")
    report = _validate(uri, manifest) if cache_dir is None else _validate_once(uri, manifest, cache_dir)
    _act_on_bad_rows(report, on_bad_rows)
    return report


def _validate_once(uri: str, manifest: Manifest, cache_dir: str | Path) -> ValidationReport:
    """The report stored in cache_dir for this exact folder state, else a fresh one (then stored)."""
    stamp = _folder_stamp(uri, manifest)
    report = _load_report(cache_dir, manifest, stamp)
    if report is None:
        report = _validate(uri, manifest)
        _save_report(cache_dir, manifest, stamp, report)
    return report


def _validate(uri: str, manifest: Manifest) -> ValidationReport:
    """Read and check every shard; file-level problems raise, bad rows are returned."""
    digest, bad, num_rows = hashlib.sha256(), [], 0
    # Sorted names: the content hash is defined over the shards' bytes in that order.
    for name, data, table in _shards_in_order(uri, sorted(manifest.shards)):
        digest.update(data)
        _check_structure(uri, name, table, manifest)
        bad.extend(_bad_rows(name, table, manifest))
        num_rows += table.num_rows
    if digest.hexdigest() != manifest.content_hash:
        raise ShardError(f"{manifest_uri(uri)}: content_hash is {manifest.content_hash} but the shards hash to "
                         f"{digest.hexdigest()}; the shards were modified or replaced after the manifest was "
                         f"written. Restore the original shards or re-create the folder")
    return ValidationReport(uri=uri, num_shards=len(manifest.shards), num_rows=num_rows, bad_rows=tuple(bad))


def _folder_stamp(uri: str, manifest: Manifest) -> str:
    """A digest of what a stored report vouches for: the folder, the manifest's content hash and each shard's
    size and modification stamps. Any rewrite, truncation or replacement of a shard changes it. Local files
    add ctime and inode (a copy keeping mtime, cp -p or rsync -a, still changes those); S3 gives size and
    LastModified, which the server sets on every upload (to the second)."""
    fs, folder = storage.resolve(uri)
    names = sorted(manifest.shards)
    if isinstance(fs, pafs.LocalFileSystem):
        stamps = [_local_stamp(os.path.join(folder, name)) for name in names]
    else:
        with storage.reaching(uri):  # one listing call instead of a request per shard
            infos = {i.base_name: i for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))}
        stamps = [f"{infos[n].size} {infos[n].mtime_ns}" if n in infos else "missing" for n in names]
    text = "\n".join([uri, manifest.content_hash, *(f"{n} {s}" for n, s in zip(names, stamps))])
    return hashlib.sha256(text.encode()).hexdigest()


def _local_stamp(path: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"


def _report_uri(cache_dir: str | Path, manifest: Manifest, stamp: str) -> str:
    return storage.join(str(cache_dir), f"shards-{manifest.content_hash[:16]}-{stamp[:16]}.json")


def _save_report(cache_dir: str | Path, manifest: Manifest, stamp: str, report: ValidationReport) -> None:
    data: dict[str, Any] = {"stamp": stamp, **asdict(report)}
    storage.write_bytes(_report_uri(cache_dir, manifest, stamp), json.dumps(data).encode())


def _load_report(cache_dir: str | Path, manifest: Manifest, stamp: str) -> ValidationReport | None:
    """The stored report for exactly this folder state, or None (absent, unreadable or for another state)."""
    path = _report_uri(cache_dir, manifest, stamp)
    if not storage.exists(path):
        return None
    try:
        data = json.loads(storage.read_bytes(path))
        if data.pop("stamp") != stamp:
            return None
        bad = tuple(BadRow(**b) for b in data.pop("bad_rows"))
        report = ValidationReport(bad_rows=bad, **data)
    except (ValueError, KeyError, TypeError) as exc:  # a half-written or foreign file: validate again
        log.warning("ignoring unreadable validation report %s (%s)", path, exc)
        return None
    log.info("%s: shards unchanged since validated (%s); not read again", report.uri, path)
    return report


def _act_on_bad_rows(report: ValidationReport, on_bad_rows: BadRowPolicy) -> None:
    if not report.bad_rows:
        log.info("%s: %d shards, %d rows, all valid", report.uri, report.num_shards, report.num_rows)
        return
    shown = "; ".join(b.describe() for b in report.bad_rows[:_SHOWN])
    more = f" (and {report.num_bad - _SHOWN} more)" if report.num_bad > _SHOWN else ""
    if on_bad_rows == "error":
        raise ShardError(f"{report.uri}: {report.num_bad} bad row(s) of {report.num_rows}: {shown}{more}. "
                         f"To go on, {_FIX}")
    log.warning("%s: skipping %d bad row(s) of %d (data.on_bad_rows=skip): %s%s", report.uri, report.num_bad,
                report.num_rows, shown, more)
