"""The Parquet trajectory-shard schema: writing episodes to shards and reading them back with Ray Data."""

from __future__ import annotations

import hashlib
import io
import logging
import zlib
from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data import storage
from pipeline.data.ingest import cache_rows, cached_blocks, in_memory_bytes, read_footers, read_parquet
from pipeline.data.manifest import EpisodeEntry, Manifest, Stats, read_manifest, write_manifest
from pipeline.errors import BadInput
from pipeline.sim.metaworld_env import Episode

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

# One row per time step; image, proprio and action are flat fixed-size lists so Ray Data hands
# them to the trainer as 2-D (rows, n) arrays without per-row Python objects.
REQUIRED_COLUMNS = ("episode_id", "step", "task", "instruction", "image", "proprio", "action", "done")
MAX_SHARDS = 100_000  # five digits keep name order == write order, which the content hash relies on
_KEY_SEP = "\x1f"  # ASCII unit separator: cannot occur in an episode id written by collect or import


def shard_name(index: int) -> str:
    if index >= MAX_SHARDS:
        raise ValueError(f"shard index {index} needs more than 5 digits; raise rows_per_shard so the "
                         f"dataset fits in {MAX_SHARDS} shards")
    return f"shard-{index:05d}.parquet"


def row_key(episode_id: str, step: int) -> str:
    """The (episode_id, step) identity of a row as one string, the form the row filter compares."""
    return f"{episode_id}{_KEY_SEP}{step}"


def shard_schema(image_shape: tuple[int, int, int], proprio_dim: int, action_dim: int) -> pa.Schema:
    h, w, c = image_shape
    return pa.schema([
        ("episode_id", pa.string()),
        ("step", pa.int32()),
        ("task", pa.string()),
        ("instruction", pa.string()),
        ("image", pa.list_(pa.uint8(), h * w * c)),
        ("proprio", pa.list_(pa.float32(), proprio_dim)),
        ("action", pa.list_(pa.float32(), action_dim)),
        ("done", pa.bool_()),
    ])


def _fixed_list(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    rows = values.reshape(values.shape[0], -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), type=dtype), rows.shape[1])


def episode_table(ep: Episode, schema: pa.Schema) -> pa.Table:
    """One episode as rows of the shard schema."""
    t = ep.num_steps
    done = np.zeros(t, dtype=bool)
    done[-1] = True
    return pa.Table.from_arrays([
        pa.array([ep.episode_id] * t, pa.string()),
        pa.array(np.arange(t, dtype=np.int32)),
        pa.array([ep.task] * t, pa.string()),
        pa.array([ep.instruction] * t, pa.string()),
        _fixed_list(np.ascontiguousarray(ep.images, dtype=np.uint8), pa.uint8()),
        _fixed_list(ep.proprio.astype(np.float32), pa.float32()),
        _fixed_list(ep.actions.astype(np.float32), pa.float32()),
        pa.array(done),
    ], schema=schema)


def _check_episodes(episodes: list[Episode], dropped: int) -> None:
    if not episodes:
        raise ValueError(f"no successful episodes to write ({dropped} dropped as failures); "
                         f"set collect.keep_failed=true or more episodes (collect.episodes_per_task, "
                         f"collect.max_steps)")
    first = episodes[0]
    for ep in episodes:
        shapes = (ep.images.shape[1:], ep.proprio.shape[1:], ep.actions.shape[1:])
        if shapes != (first.images.shape[1:], first.proprio.shape[1:], first.actions.shape[1:]):
            raise ValueError(f"episode {ep.episode_id} has image/proprio/action shapes {shapes}, unlike "
                             f"{first.episode_id}; one shard folder holds one camera/image size")


def _serialise(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # Row groups of ~256 rows (3 MB at 64x64) let Ray Data split a shard across readers.
    pq.write_table(table, buf, row_group_size=256)
    return buf.getvalue()


def _manifest_for(episodes: list[Episode], names: list[str], content_hash: str, dropped: int) -> Manifest:
    first = episodes[0]
    tasks = list(dict.fromkeys(ep.task for ep in episodes))
    return Manifest(
        action_dim=first.actions.shape[1], proprio_dim=first.proprio.shape[1],
        image_shape=list(first.images.shape[1:]),
        action_stats=Stats.of(np.concatenate([ep.actions for ep in episodes]), "action"),
        proprio_stats=Stats.of(np.concatenate([ep.proprio for ep in episodes]), "proprio"),
        num_episodes=len(episodes), num_steps=sum(ep.num_steps for ep in episodes),
        tasks=tasks, instructions={ep.task: ep.instruction for ep in episodes},
        episodes=[EpisodeEntry(episode_id=ep.episode_id, task=ep.task, seed=ep.seed,
                               num_steps=ep.num_steps, success=ep.success) for ep in episodes],
        shards=names, content_hash=content_hash, dropped_episodes=dropped)


class ShardWriter:
    """Streams tables into shard-00000.parquet, ... of rows_per_shard rows each, hashing as it writes,
    so an importer never holds more than one shard of images in memory."""

    def __init__(self, uri: str, schema: pa.Schema, rows_per_shard: int) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard={rows_per_shard}; must be >= 1, e.g. 2000")
        self.uri, self.schema, self.rows_per_shard = uri, schema, rows_per_shard
        self.names: list[str] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        # Same digest as manifest.hash_shards: shards are written in name order.
        self._digest = hashlib.sha256()

    def add(self, table: pa.Table) -> None:
        if not table.schema.equals(self.schema):
            raise ValueError(f"rows for {self.uri} have schema {table.schema}, expected {self.schema}")
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def close(self) -> tuple[list[str], str]:
        """(shard names, content hash) once the last partial shard is written."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        return list(self.names), self._digest.hexdigest()

    def _flush(self, rows: int) -> None:
        # concat_tables only chains chunks, so slicing copies nothing until serialisation.
        table = pa.concat_tables(self._pending)
        rest = table.slice(rows)
        data = _serialise(table.slice(0, rows))
        name = shard_name(len(self.names))
        storage.write_bytes(storage.join(self.uri, name), data)
        self._digest.update(data)
        self.names.append(name)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows


def write_shards(episodes: list[Episode], uri: str, rows_per_shard: int, dropped: int = 0) -> Manifest:
    """Write episodes as shard-00000.parquet, ... plus manifest.json into a local folder or s3:// prefix."""
    _check_episodes(episodes, dropped)
    first = episodes[0]
    schema = shard_schema(tuple(first.images.shape[1:]), first.proprio.shape[1], first.actions.shape[1])
    writer = ShardWriter(uri, schema, rows_per_shard)
    for ep in episodes:
        writer.add(episode_table(ep, schema))
    names, content_hash = writer.close()
    manifest = _manifest_for(episodes, names, content_hash, dropped)
    write_manifest(uri, manifest)
    log.info("wrote %d episodes, %d rows in %d shards to %s", manifest.num_episodes, manifest.num_steps,
             len(names), uri)
    return manifest


def shard_files(uri: str, manifest: Manifest) -> list[str]:
    """The manifest's shards as full URIs (s3://...) or absolute local paths."""
    if storage.is_s3(uri):
        return [storage.join(uri, name) for name in manifest.shards]
    return [storage.resolve(storage.join(uri, name))[1] for name in manifest.shards]


def check_columns(uri: str, manifest: Manifest) -> list[pq.FileMetaData]:
    """Read each shard's footer and name the first file lacking a required column; returns the footers."""
    fix = f"re-run `actdistill collect` for {uri}"
    footers = read_footers(shard_files(uri, manifest), fix)
    for name, footer in zip(manifest.shards, footers):
        missing = [c for c in REQUIRED_COLUMNS if c not in footer.schema.to_arrow_schema().names]
        if missing:
            raise BadInput(f"{storage.join(uri, name)} lacks column(s) {missing}; shards need "
                           f"{list(REQUIRED_COLUMNS)}. Re-run `actdistill collect` for {uri}")
    return footers


def filter_rows(batch: pa.Table, keep: pa.Array | None, skip: pa.Array | None) -> pa.Table:
    """Rows of kept episodes whose (episode_id, step) is not in skip; null masks count as dropped."""
    masks = []
    if keep is not None:
        masks.append(pc.is_in(batch["episode_id"], value_set=keep))
    if skip is not None:
        keys = pc.binary_join_element_wise(batch["episode_id"], pc.cast(batch["step"], pa.string()), _KEY_SEP)
        # A row with a null key cannot be named, so it never passes once bad rows are being skipped.
        masks.append(pc.and_(pc.is_valid(keys), pc.invert(pc.is_in(keys, value_set=skip))))
    mask = masks[0]
    for more in masks[1:]:
        mask = pc.and_(mask, more)
    return batch.filter(mask)


def open_shards(uri: str, manifest: Manifest | None = None, episodes: set[str] | None = None,
                skip_rows: Collection[tuple[str, int]] | None = None, cache: bool | None = None
                ) -> ray.data.Dataset:
    """A Ray Dataset over a shard folder, optionally only the rows of the given episode ids and
    without the (episode_id, step) rows validation reported as bad (ValidationReport.skip_rows).

    The rows are read once and cached in the object store when they fit (cache=None decides by size, see
    pipeline.data.ingest), so each further pass over them costs no re-read; cache=False always streams.
    """
    manifest = manifest or read_manifest(uri)
    blocks = cached_blocks(in_memory_bytes(check_columns(uri, manifest)), uri, cache)
    ds = read_parquet(shard_files(uri, manifest), uri, blocks)
    keep = pa.array(sorted(episodes), pa.string()) if episodes is not None else None
    skip = pa.array(sorted(row_key(e, s) for e, s in skip_rows), pa.string()) if skip_rows is not None else None
    if skip is not None:
        log.info("leaving %d bad row(s) of %s out of the dataset", len(skip), uri)
    if keep is not None or skip is not None:
        ds = ds.map_batches(filter_rows, batch_format="pyarrow", fn_kwargs={"keep": keep, "skip": skip},
                            zero_copy_batch=True)
    return cache_rows(ds, blocks, uri)


def shuffle_each_epoch(data: ray.data.Dataset, seed: int) -> ray.data.Dataset:
    """A global shuffle that Ray Data re-seeds on every execution, i.e. every epoch a Train worker reads:
    seed=int repeated one order every epoch. The seed of epoch e is (seed, e), counted per dataset from 0,
    so a restarted run (whose workers read from epoch 0 again) replays the same orders."""
    from ray.data import RandomSeedConfig

    return data.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def split_episodes(manifest: Manifest, val_fraction: float) -> tuple[set[str], set[str]]:
    """(train ids, val ids): a hash ranking, so the split is the same on every run and machine."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}; must be in [0, 1), e.g. 0.2")
    ids = sorted((zlib.crc32(e.episode_id.encode()), e.episode_id) for e in manifest.episodes)
    n = len(ids)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        # Both sides non-empty whenever that is possible; a single episode goes to training.
        n_val = min(max(round(val_fraction * n), 1), n - 1)
    val = {eid for _, eid in ids[:n_val]}
    return {eid for _, eid in ids[n_val:]}, val
