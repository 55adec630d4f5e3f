"""The shard folder's manifest: schema, normalisation statistics, episode list and a content hash."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.data import storage
from pipeline.errors import BadInput, MissingInput

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
STD_FLOOR = 1e-6  # a constant dimension (e.g. an unused gripper) must not divide by zero


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stats(_Strict):
    """Per-dimension statistics of one vector column over every row of the dataset."""

    mean: list[float]
    std: list[float]
    q01: list[float]
    q99: list[float]

    @classmethod
    def of(cls, values: np.ndarray, column: str = "values") -> Stats:
        """Stats of a (rows, dims) array; std floored so normalisation never divides by zero.

        Rows holding NaN/inf are left out: one bad row must not poison every normalised value, and
        validate_shards reports (or skips) such rows before training sees them.
        """
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values).all(axis=1)]
        if not len(values):
            raise ValueError(f"every row of {column} holds NaN/inf (or there are no rows); no statistics "
                             f"can be computed. Fix the source data")
        return cls(mean=values.mean(0).tolist(),
                   std=np.maximum(values.std(0), STD_FLOOR).tolist(),
                   q01=np.quantile(values, 0.01, axis=0).tolist(),
                   q99=np.quantile(values, 0.99, axis=0).tolist())


class EpisodeEntry(_Strict):
    episode_id: str
    task: str
    seed: int
    num_steps: int
    success: bool


class Manifest(_Strict):
    """Everything a reader needs to trust and use a shard folder without opening the shards."""

    schema_version: Literal[1] = SCHEMA_VERSION
    action_dim: int
    proprio_dim: int
    image_shape: list[int]  # H, W, C
    action_stats: Stats
    proprio_stats: Stats
    num_episodes: int
    num_steps: int
    tasks: list[str]
    instructions: dict[str, str]
    episodes: list[EpisodeEntry]
    shards: list[str]  # file names relative to the folder holding manifest.json
    content_hash: str  # sha256 over the shards' bytes, in sorted name order
    dropped_episodes: int = 0


def manifest_uri(uri_folder: str) -> str:
    return storage.join(uri_folder, MANIFEST_NAME)


def write_manifest(uri_folder: str, manifest: Manifest) -> None:
    storage.write_bytes(manifest_uri(uri_folder), manifest.model_dump_json(indent=2).encode())


def read_manifest(uri_folder: str) -> Manifest:
    """The folder's manifest; a missing or invalid file is an error naming it and the fix."""
    uri = manifest_uri(uri_folder)
    if not storage.exists(uri):
        raise MissingInput(f"{uri} does not exist; run `actdistill collect` to write shards there, "
                           f"or point data.shards_uri at a folder that has a manifest")
    try:
        return Manifest.model_validate(json.loads(storage.read_bytes(uri)))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise BadInput(f"{uri} is not a valid schema-v{SCHEMA_VERSION} manifest ({exc}); "
                       f"re-run `actdistill collect` to rewrite the folder") from None


def hash_shards(contents: dict[str, bytes]) -> str:
    """sha256 over file bytes in sorted name order: the dataset's identity in runs and checkpoints."""
    digest = hashlib.sha256()
    for name in sorted(contents):
        digest.update(contents[name])
    return digest.hexdigest()


def verify_hash(uri_folder: str, manifest: Manifest) -> None:
    """Re-read every shard and check the content hash; a mismatch means the folder changed."""
    found = hash_shards({name: storage.read_bytes(storage.join(uri_folder, name)) for name in manifest.shards})
    if found != manifest.content_hash:
        raise BadInput(f"{manifest_uri(uri_folder)}: content_hash is {manifest.content_hash} but the shards "
                       f"hash to {found}; the shards were modified or replaced after collection. "
                       f"Re-run `actdistill collect` for this folder, or restore the original shards")
