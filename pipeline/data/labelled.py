"""Labelled shards: trajectory rows plus the frozen teacher's per-layer targets, with their identity file."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
import ray.data
from pydantic import BaseModel, ConfigDict

from pipeline.data import storage
from pipeline.data.ingest import cache_rows, cached_blocks, in_memory_bytes, read_footers, read_parquet
from pipeline.data.shards import filter_rows
from pipeline.errors import BadInput, MissingInput, StaleInput

LABELS_FILE = "labels.json"
LABEL_COLUMNS = ("episode_id", "step", "teacher_hash", "teacher_sem", "teacher_act", "teacher_action")


class Labels(BaseModel):
    """What a labelled folder holds and which teacher made it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    teacher_hash: str
    source_content_hash: str
    num_layers: int
    semantic_dim: int
    action_dim: int
    num_rows: int


def clear(uri: str) -> None:
    """Empty the folder first: labels from an earlier teacher must never mix with new ones."""
    fs, path = storage.resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path)


def write_labels(uri: str, labels: Labels) -> None:
    storage.write_bytes(storage.join(uri, LABELS_FILE), labels.model_dump_json(indent=2).encode())


def read_labels(uri: str) -> Labels:
    path = storage.join(uri, LABELS_FILE)
    if not storage.exists(path):
        raise MissingInput(f"{path} not found: {uri} holds no labelled shards; run "
                           f"`actdistill probe-teacher` first")
    return Labels(**json.loads(storage.read_bytes(path)))


def check_teacher(labels: Labels, teacher_hash: str, uri: str) -> None:
    if labels.teacher_hash != teacher_hash:
        raise StaleInput(f"{storage.join(uri, LABELS_FILE)} was made by teacher {labels.teacher_hash}, but the "
                         f"teacher checkpoint is {teacher_hash}; re-run `actdistill probe-teacher` so the "
                         f"targets match the teacher")


def open_labelled(uri: str, episodes: set[str] | None = None, cache: bool | None = None) -> ray.data.Dataset:
    """Labelled rows (optionally only some episodes); missing label columns are an error. Cached in the object
    store when they fit, like open_shards (see pipeline.data.ingest)."""
    files = storage.list_files(uri, suffix=".parquet")
    if not files:
        raise MissingInput(f"{uri} holds no labelled shards (*.parquet); run `actdistill probe-teacher` first")
    footers = read_footers(files, f"re-run `actdistill probe-teacher` to re-create {uri}")
    for file, footer in zip(files, footers):
        missing = [c for c in LABEL_COLUMNS if c not in footer.schema.to_arrow_schema().names]
        if missing:
            raise BadInput(f"{file}: labelled shards lack column(s) {missing}; re-run `actdistill probe-teacher`")
    blocks = cached_blocks(in_memory_bytes(footers), uri, cache)
    ds = read_parquet(files, uri, blocks)
    if episodes is not None:
        ds = ds.map_batches(filter_rows, batch_format="pyarrow", zero_copy_batch=True,
                            fn_kwargs={"keep": pa.array(sorted(episodes), pa.string()), "skip": None})
    return cache_rows(ds, blocks, uri)
