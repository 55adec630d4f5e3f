"""How Parquet files become Ray Datasets for training: read once at planning time, cached in memory when small.

Why (measured on 2 cores, 3,920 rows of 64x64x3 in 20 shards, bench/ingest.py): Ray 2.60's default Parquet
reader (DataSourceV2) re-plans every pass over the data. Each pass starts a ListFiles task that spawns a pool of
32 FooterReader actor processes to re-read the footers, then packs every row group into one 128 MiB read task,
so no row reaches a worker before the whole folder is read: 10-20 s per pass, nearly all of it before the first
batch. Every epoch of train-teacher, distill and the probe fit pays that again. Here the footers are read once
on the driver (the V1 Parquet reader), and a dataset that fits comfortably in the object store is read once
and cached there, so a later pass only streams cached blocks (~0.2 s for the same 3,920 rows).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import storage
from pipeline.errors import BadInput, MissingInput

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

# Cache a dataset when it needs at most this share of the cluster's object store: a per-epoch random_shuffle
# holds a second copy while it runs, and training and Ray Data's own buffers need the rest. On a 24 GiB
# machine Ray's default store is ~7 GiB, so up to ~1.7 GB of rows (~140k rows of 64x64x3) are cached.
CACHE_FRACTION = 0.25
# Cached blocks: few, because a random_shuffle re-runs each epoch with 2 tasks per block (60 blocks of 1 MiB
# cost 5-7 s per epoch on 2 cores, 4 blocks 0.3 s); at least 4 so 2-4 train workers each get whole blocks;
# at most 128 MiB each, Ray Data's default block size limit.
CACHED_BLOCKS_MIN = 4
CACHED_BLOCK_BYTES = 128 * 1024 * 1024
FOOTER_THREADS = 8  # footers are a few KB each; threads overlap S3 round trips (pyarrow releases the GIL)


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's progress bars (off unless verbose) in this process: a dataset copies the current
    DataContext when it is created, and its split coordinators inside Ray Train take that copy, so this runs
    on the driver (and in a Tune trial's process) before any dataset is made. Redrawn bars were ~8,000 of
    the smoke run's 9,100 lines."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)


def read_footers(uris: list[str], fix: str) -> list[pq.FileMetaData]:
    """Each file's Parquet footer (schema and row-group sizes), in order. A missing or truncated file is an
    error naming it, followed by `fix` (what re-creates the folder)."""
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        return list(pool.map(lambda uri: _footer(uri, fix), uris))


def _footer(uri: str, fix: str) -> pq.FileMetaData:
    fs, path = storage.resolve(uri)
    try:
        with storage.reaching(uri):
            return pq.read_metadata(path, filesystem=fs)
    except FileNotFoundError:
        raise MissingInput(f"{uri} is listed but missing; {fix}") from None
    except pa.ArrowInvalid as exc:
        raise BadInput(f"{uri} is not a readable Parquet file ({exc}); it was probably truncated by an "
                       f"interrupted copy. Restore it, or {fix}") from None


def in_memory_bytes(footers: list[pq.FileMetaData]) -> int:
    """Uncompressed size of every row group: close to the Arrow size in memory (images dominate; strings are
    dictionary-encoded on disk, ~50 bytes of 12 KB per 64x64 row)."""
    return sum(f.row_group(i).total_byte_size for f in footers for i in range(f.num_row_groups))


@contextmanager
def _planned_reads() -> Iterator[None]:
    """Plan reads with the V1 Parquet reader (footers read once here, each pass only runs the read tasks), in the
    files' order. The dataset keeps a copy of this context: without preserve_order, its cached blocks came out in the
    order their read tasks finished, so a seeded shuffle over them gave another order of rows (seen on a 3-node
    cluster, where reads run on several nodes: a resumed run trained on rows its uninterrupted twin never saw)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2, ctx.execution_options.preserve_order
    ctx.use_datasource_v2, ctx.execution_options.preserve_order = False, True
    try:
        yield
    finally:
        ctx.use_datasource_v2, ctx.execution_options.preserve_order = before


def cached_blocks(num_bytes: int, folder: str, cache: bool | None = None) -> int | None:
    """How many blocks to cache rows of ~num_bytes in, or None to stream them from storage on every pass.
    cache=None caches when they fit CACHE_FRACTION of the object store; True or False forces the choice."""
    store = _object_store_bytes()
    if cache is None:
        cache = num_bytes <= CACHE_FRACTION * store
    if not cache:
        log.info("streaming %s on every pass: ~%.0f MB, uncached (object store %.0f MB)", folder,
                 num_bytes / 1e6, store / 1e6)
        return None
    blocks = max(CACHED_BLOCKS_MIN, math.ceil(num_bytes / CACHED_BLOCK_BYTES))
    log.info("caching %s: ~%.0f MB in %d blocks (object store %.0f MB)", folder, num_bytes / 1e6, blocks,
             store / 1e6)
    return blocks


def read_parquet(uris: list[str], folder: str, num_blocks: int | None = None) -> ray.data.Dataset:
    """A lazy Dataset over the given files of one folder (all local or all under one s3:// prefix), in
    num_blocks blocks (set at read time: a later repartition would cost another pass over the rows) or, with
    None, Ray Data's default of ~1 MiB blocks, which let a streamed pass hand out rows as soon as one is read."""
    import ray.data

    fs, _ = storage.resolve(folder)
    paths = [storage.resolve(uri)[1] for uri in uris]
    with storage.reaching(folder), _planned_reads():
        return ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=num_blocks)


def cache_rows(ds: ray.data.Dataset, num_blocks: int | None, folder: str) -> ray.data.Dataset:
    """Read ds (folder's rows) into the object store now when cached_blocks chose to cache it; else leave it
    lazy."""
    if num_blocks is None:
        return ds
    log.info("reading %s into the object store", folder)
    return ds.materialize()


def _object_store_bytes() -> float:
    import ray

    from pipeline.ray_runtime import init_address

    if not ray.is_initialized():  # Ray Data would start a local Ray at the read anyway; its size is needed first
        ray.init(address=init_address(os.environ.get("RAY_ADDRESS")))
    return float(ray.cluster_resources().get("object_store_memory", 0.0))
