"""Import a LeRobotDataset v3 folder (Parquet frames with image columns) into trajectory shards + manifest."""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data import storage
from pipeline.data.manifest import EpisodeEntry, Manifest, Stats, write_manifest
from pipeline.data.shards import ShardWriter, shard_schema

log = logging.getLogger(__name__)

INFO = "meta/info.json"
STATE, ACTION = "observation.state", "action"
KEY_COLUMNS = ("episode_index", "frame_index")


class LeRobotFormatError(ValueError):
    """The folder is not a LeRobotDataset v3 this importer can read; the message names file, row or key."""


@dataclass(frozen=True)
class Layout:
    """Which columns of the LeRobot frames become our image, proprio and action, and their sizes."""

    camera: str
    image_shape: tuple[int, int, int]  # H, W, C
    proprio_dim: int
    action_dim: int


@dataclass
class _Episode:
    episode_index: int
    task: str
    last_frame: int
    num_steps: int = 0


def read_info(folder: str) -> dict:
    uri = storage.join(folder, *INFO.split("/"))
    if not storage.exists(uri):
        raise LeRobotFormatError(f"{uri} does not exist; --src must be a LeRobotDataset v3 folder holding "
                                 f"meta/info.json and data/chunk-*/file-*.parquet")
    try:
        info = json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise LeRobotFormatError(f"{uri} is not valid JSON ({exc})") from None
    if not isinstance(info.get("features"), dict):
        raise LeRobotFormatError(f"{uri} has no 'features' mapping; it must describe {STATE}, {ACTION} and "
                                 f"observation.images.* with shape and dtype")
    return info


def _vector_dim(features: dict, key: str, uri: str) -> int:
    feature = features.get(key)
    if feature is None:
        raise LeRobotFormatError(f"{uri}: features lacks {key!r} (has {sorted(features)}); the importer maps "
                                 f"{STATE} to proprio and {ACTION} to actions")
    shape = feature.get("shape")
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] > 0):
        raise LeRobotFormatError(f"{uri}: features.{key}.shape={shape!r}; expected one positive length, e.g. [7]")
    return shape[0]


def _image_shape(feature: dict, key: str, uri: str) -> tuple[int, int, int]:
    shape, names = feature.get("shape"), feature.get("names")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise LeRobotFormatError(f"{uri}: features.{key}.shape={shape!r}; expected [height, width, channels]")
    # LeRobot writes images height-first, but some converters write channels-first: trust the names.
    if isinstance(names, list) and len(names) == 3 and str(names[0]).startswith("channel"):
        c, h, w = shape
        return h, w, c
    h, w, c = shape
    return h, w, c


def layout_from_info(info: dict, uri: str, camera: str | None) -> Layout:
    features = info["features"]
    images = [k for k, f in features.items() if isinstance(f, dict) and f.get("dtype") == "image"]
    if camera is None:
        if not images:
            videos = [k for k, f in features.items() if isinstance(f, dict) and f.get("dtype") == "video"]
            hint = f" ({', '.join(videos)} are videos, which this importer does not decode)" if videos else ""
            raise LeRobotFormatError(f"{uri}: no feature has dtype 'image'{hint}; store camera frames as "
                                     f"image columns (LeRobotDataset(..., use_videos=False))")
        camera = images[0]
        if len(images) > 1:
            log.info("using camera %s; %s not imported (one camera per shard folder)", camera, images[1:])
    elif camera not in images:
        raise LeRobotFormatError(f"{uri}: camera {camera!r} is not an image feature; choose from {images}")
    return Layout(camera=camera, image_shape=_image_shape(features[camera], camera, uri),
                  proprio_dim=_vector_dim(features, STATE, uri), action_dim=_vector_dim(features, ACTION, uri))


def read_tasks(folder: str) -> dict[int, str]:
    """task_index -> text from meta/tasks.parquet (v3) or meta/tasks.jsonl (v2.x); {} when neither exists."""
    parquet, jsonl = storage.join(folder, "meta", "tasks.parquet"), storage.join(folder, "meta", "tasks.jsonl")
    if storage.exists(parquet):
        table = pq.read_table(pa.BufferReader(storage.read_bytes(parquet)))
        # v3 writes a pandas frame indexed by the task text; the index lands in a "task" column or,
        # when unnamed, in "__index_level_0__".
        text = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
        if text is None or "task_index" not in table.column_names:
            raise LeRobotFormatError(f"{parquet} has columns {table.column_names}; expected task_index and "
                                     f"the task text (column 'task' or the pandas index)")
        return dict(zip(table["task_index"].to_pylist(), table[text].to_pylist()))
    if storage.exists(jsonl):
        lines = storage.read_bytes(jsonl).decode().splitlines()
        try:
            rows = [json.loads(line) for line in lines if line.strip()]
            return {int(r["task_index"]): str(r["task"]) for r in rows}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise LeRobotFormatError(f"{jsonl}: every line must be {{\"task_index\": N, \"task\": TEXT}} "
                                     f"({exc})") from None
    return {}


def data_files(folder: str) -> list[str]:
    files = storage.list_files(storage.join(folder, "data"), ".parquet", recursive=True)
    if not files:
        raise LeRobotFormatError(f"{storage.join(folder, 'data')} holds no .parquet files; expected "
                                 f"data/chunk-000/file-000.parquet and so on")
    return files


def _read(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.resolve(uri)
    with storage.reaching(uri):
        return pq.read_table(path, filesystem=fs, columns=columns)


def _check_columns(uri: str, table: pa.Table, needed: list[str]) -> None:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise LeRobotFormatError(f"{uri} lacks column(s) {missing} (has {table.column_names}); LeRobot v3 "
                                 f"frames need {list(KEY_COLUMNS)} plus the features in {INFO}")


def _task_of(uri: str, row: int, task_index: int | None, tasks: dict[int, str], instruction: str | None) -> str:
    if tasks and task_index is not None:
        if task_index not in tasks:
            raise LeRobotFormatError(f"{uri} row {row}: task_index={task_index} is not in meta/tasks "
                                     f"(known: {sorted(tasks)})")
        return tasks[task_index]
    if instruction:
        return instruction
    raise LeRobotFormatError(f"{uri}: no meta/tasks.parquet or meta/tasks.jsonl gives the task text; pass "
                             f"--instruction 'what the robot is asked to do'")


def scan_episodes(files: list[str], tasks: dict[int, str], instruction: str | None) -> dict[int, _Episode]:
    """A first, cheap pass over the key columns: every episode's task and last frame (for `done`)."""
    episodes: dict[int, _Episode] = {}
    for uri in files:
        fs, path = storage.resolve(uri)
        with storage.reaching(uri):
            present = pq.read_schema(path, filesystem=fs).names
        table = _read(uri, [c for c in (*KEY_COLUMNS, "task_index") if c in present])
        _check_columns(uri, table, list(KEY_COLUMNS))
        task_index = (table["task_index"].to_pylist() if "task_index" in table.column_names
                      else [None] * table.num_rows)
        for row, (ep, frame) in enumerate(zip(table["episode_index"].to_pylist(), table["frame_index"].to_pylist())):
            if ep is None or frame is None:
                raise LeRobotFormatError(f"{uri} row {row}: episode_index/frame_index is null")
            if ep not in episodes:
                episodes[ep] = _Episode(ep, _task_of(uri, row, task_index[row], tasks, instruction), frame)
            episodes[ep].last_frame = max(episodes[ep].last_frame, frame)
    return episodes


def _vectors(uri: str, table: pa.Table, column: str, width: int) -> np.ndarray:
    """A list column as a (rows, width) float32 array; NaN/inf pass through for validate_shards to judge."""
    col = table[column].combine_chunks()
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise LeRobotFormatError(f"{uri} row {row}: {column} is null")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != width)
    if len(wrong):
        raise LeRobotFormatError(f"{uri} row {int(wrong[0])}: {column} has {lengths[wrong[0]]} values but "
                                 f"{INFO} says shape [{width}]")
    return pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)


def _decode_image(uri: str, row: int, cell: dict | None, camera: str, shape: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image

    data = (cell or {}).get("bytes")
    if not data:
        raise LeRobotFormatError(f"{uri} row {row}: {camera} has no embedded image bytes "
                                 f"(path={(cell or {}).get('path')!r}); re-save the dataset with images embedded")
    h, w, c = shape
    with Image.open(io.BytesIO(data)) as img:
        pixels = np.asarray(img.convert("RGB" if c == 3 else "L" if c == 1 else "RGBA"))
    pixels = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)
    if pixels.shape != shape:
        raise LeRobotFormatError(f"{uri} row {row}: {camera} decodes to {pixels.shape[0]}x{pixels.shape[1]}x"
                                 f"{pixels.shape[2]} but {INFO} says {h}x{w}x{c}; fix features.{camera}.shape "
                                 f"or re-save the images at that size")
    return pixels


def _images(uri: str, table: pa.Table, layout: Layout) -> np.ndarray:
    cells = table[layout.camera].to_pylist()
    return np.stack([_decode_image(uri, row, cell, layout.camera, layout.image_shape)
                     for row, cell in enumerate(cells)]).reshape(len(cells), -1)


def _fixed(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=dtype), values.shape[1])


def convert_file(uri: str, layout: Layout, episodes: dict[int, _Episode], prefix: str,
                 schema: pa.Schema) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """One LeRobot data file as rows of our shard schema, plus its actions and proprio for statistics."""
    table = _read(uri)
    _check_columns(uri, table, [*KEY_COLUMNS, STATE, ACTION, layout.camera])
    table = table.sort_by([(k, "ascending") for k in KEY_COLUMNS])
    ep_index = table["episode_index"].to_pylist()
    frames = np.asarray(table["frame_index"].to_pylist(), dtype=np.int32)
    proprio = _vectors(uri, table, STATE, layout.proprio_dim)
    actions = _vectors(uri, table, ACTION, layout.action_dim)
    tasks = [episodes[e].task for e in ep_index]
    out = pa.Table.from_arrays([
        pa.array([f"{prefix}/e{e:06d}" for e in ep_index], pa.string()),
        pa.array(frames),
        pa.array(tasks, pa.string()),
        pa.array(tasks, pa.string()),  # LeRobot's task text is already the instruction
        _fixed(_images(uri, table, layout), pa.uint8()),
        _fixed(proprio, pa.float32()),
        _fixed(actions, pa.float32()),
        pa.array([f == episodes[e].last_frame for e, f in zip(ep_index, frames.tolist())]),
    ], schema=schema)
    for e in ep_index:
        episodes[e].num_steps += 1
    return out, actions, proprio


def import_lerobot(folder: str, out_uri: str, instruction: str | None = None, rows_per_shard: int = 2000,
                   camera: str | None = None) -> Manifest:
    """Convert a LeRobotDataset v3 folder (local or s3://) into shards + manifest at out_uri.

    episode_index/frame_index become episode_id/step, observation.state becomes proprio, the camera
    (default: the first image feature) becomes image; the task text comes from meta/tasks.* when present,
    else from `instruction`. Images keep the size info.json gives them.
    """
    info = read_info(folder)
    layout = layout_from_info(info, storage.join(folder, *INFO.split("/")), camera)
    files = data_files(folder)
    episodes = scan_episodes(files, read_tasks(folder), instruction)
    prefix = PurePosixPath(folder.rstrip("/")).name or "lerobot"
    schema = shard_schema(layout.image_shape, layout.proprio_dim, layout.action_dim)
    writer = ShardWriter(out_uri, schema, rows_per_shard)
    all_actions, all_proprio = [], []
    for uri in files:
        table, actions, proprio = convert_file(uri, layout, episodes, prefix, schema)
        writer.add(table)
        all_actions.append(actions)
        all_proprio.append(proprio)
    names, content_hash = writer.close()
    manifest = _manifest(layout, episodes, prefix, names, content_hash,
                         np.concatenate(all_actions), np.concatenate(all_proprio))
    write_manifest(out_uri, manifest)
    log.info("imported %d episodes, %d frames from %s into %d shards at %s", manifest.num_episodes,
             manifest.num_steps, folder, len(names), out_uri)
    return manifest


def _manifest(layout: Layout, episodes: dict[int, _Episode], prefix: str, names: list[str], content_hash: str,
              actions: np.ndarray, proprio: np.ndarray) -> Manifest:
    ordered = [episodes[k] for k in sorted(episodes)]
    tasks = list(dict.fromkeys(ep.task for ep in ordered))
    return Manifest(
        action_dim=layout.action_dim, proprio_dim=layout.proprio_dim, image_shape=list(layout.image_shape),
        action_stats=Stats.of(actions, ACTION), proprio_stats=Stats.of(proprio, STATE),
        num_episodes=len(ordered), num_steps=int(actions.shape[0]), tasks=tasks,
        instructions={t: t for t in tasks},
        # Recorded demonstrations carry no success flag; they are taken as successful, like collect's.
        episodes=[EpisodeEntry(episode_id=f"{prefix}/e{ep.episode_index:06d}", task=ep.task,
                               seed=ep.episode_index, num_steps=ep.num_steps, success=True) for ep in ordered],
        shards=names, content_hash=content_hash)


def main(argv: list[str]) -> int:
    """`actdistill import-lerobot --src FOLDER --out URI [--instruction TEXT] [--rows-per-shard N]`."""
    p = argparse.ArgumentParser(prog="actdistill import-lerobot",
                                description="Convert a LeRobotDataset v3 folder into ActDistill shards")
    p.add_argument("--src", required=True, help="LeRobotDataset v3 folder (local or s3://)")
    p.add_argument("--out", required=True, help="shard folder to write (local or s3://), e.g. runs/x/shards")
    p.add_argument("--instruction", help="task text when the folder has no meta/tasks.parquet|jsonl")
    p.add_argument("--rows-per-shard", type=int, default=2000, help="rows per Parquet shard, e.g. 2000")
    p.add_argument("--camera", help="image feature to import, e.g. observation.images.top (default: first)")
    args = p.parse_args(argv)
    try:
        manifest = import_lerobot(args.src, args.out, args.instruction, args.rows_per_shard, args.camera)
    except (LeRobotFormatError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {manifest.num_episodes} episodes, {manifest.num_steps} steps, {len(manifest.shards)} shards "
          f"to {args.out} (content hash {manifest.content_hash[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
