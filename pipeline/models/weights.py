"""Weights read tensor by tensor from memory-mapped safetensors files, into whole or ZeRO-3-partitioned modules.

A 7B checkpoint is 13-27 GB. Reading it into memory (or `safetensors.torch.load` of its bytes) costs that much
host RAM in every worker before a single weight lands in the model. Here a file is mapped, never read: a
tensor is a view on the mapping, so only the pages a worker touches are read, from the node's page cache,
which every process on the node shares. Under ZeRO-3 a worker copies only its own partition of each tensor.
An s3:// file is first copied once to a node-local cache (mmap needs a local file).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.data import storage
from pipeline.errors import BadInput, MissingInput

# safetensors dtype names -> torch (the format's spec lists these; F8 kinds exist on recent torch only).
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
HASH_CHUNK = 64 << 20


class MappedSafetensors:
    """One .safetensors file, mapped: names and shapes from its header, tensors as views on the mapping.

    The format: 8 bytes (little-endian u64) header length, the JSON header {name: {dtype, shape, data_offsets}},
    then the data. The mapping is copy-on-write (nothing we do writes to it), so torch gets a writable buffer
    and no page is ever copied."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > size - 8:
                    raise ValueError(f"its header claims {length} bytes of a {size}-byte file")
                self.header: dict[str, Any] = json.loads(f.read(length))
            except (struct.error, ValueError, UnicodeDecodeError) as exc:
                raise BadInput(f"{self.path} is not a safetensors file ({exc}); save weights with "
                               f"safetensors (save_pretrained(..., safe_serialization=True))") from None
            self._base = 8 + length
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > self._base else None
        self.header.pop("__metadata__", None)

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def tensor(self, name: str) -> torch.Tensor:
        """A view on the mapped file: no copy; reading it touches only its own pages."""
        entry = self.header[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise BadInput(f"{self.path}: tensor {name} has dtype {entry['dtype']}, which this pipeline does not "
                           f"read; convert the checkpoint to bf16, fp16 or fp32")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self._base + begin)
        return flat.view(shape)

    def close(self) -> None:
        """Unmap the file now (else when the object is collected); a tensor still viewing it keeps it mapped."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                return
            self._map = None


class TensorSource:
    """Every tensor of a set of safetensors files (a sharded checkpoint), each read where it lies."""

    def __init__(self, files: list[MappedSafetensors], where: str) -> None:
        self.where = where
        self._file_of: dict[str, MappedSafetensors] = {}
        for f in files:
            for name in f.names():
                self._file_of[name] = f

    @classmethod
    def open(cls, uri: str, names: list[str]) -> TensorSource:
        """The files `names` of the folder `uri` (local or s3://)."""
        return cls([MappedSafetensors(local_copy(storage.join(uri, n))) for n in names], uri)

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file_of[name].shape(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self._file_of[name].tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def close(self) -> None:
        for f in set(self._file_of.values()):
            f.close()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def local_copy(uri: str, refresh: bool = False) -> Path:
    """A local path to mmap: the file itself, or (s3://) a copy in the node's cache, made once per node.

    The copy is named by the object's URI, size and modification time, so an object rewritten since is fetched
    again (refresh=True fetches it whatever the cache holds: S3's times are to the second). It streams in 64 MiB
    chunks to a temporary name and is renamed when complete, so processes that start together never map a
    half-written file (the loser of a race overwrites with identical bytes)."""
    if not storage.is_s3(uri):
        _, path = storage.resolve(uri)
        if not Path(path).is_file():
            raise MissingInput(f"{uri} does not exist; check the URI or run the stage that writes it")
        return Path(path)
    fs, path = storage.resolve(uri)
    with storage.reaching(uri):
        info = fs.get_file_info(path)
        if info.size is None:
            raise MissingInput(f"{uri} does not exist; check the URI or run the stage that writes it")
        version = f"{uri}|{info.size}|{info.mtime_ns}"
        target = (Path(tempfile.gettempdir()) / "actdistill-weights"   # the node's temp folder ($TMPDIR, else /tmp)
                  / hashlib.sha256(version.encode()).hexdigest()[:24] / uri.rsplit("/", 1)[-1])
        if target.is_file() and target.stat().st_size == info.size and not refresh:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        with fs.open_input_stream(path) as src, open(partial, "wb") as out:
            while chunk := src.read(HASH_CHUNK):
                out.write(chunk)
        os.replace(partial, target)
    return target


def file_hash(path: Path) -> str:
    """The first 16 hex digits of the file's sha256, read in chunks (the same digest as of its bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- into a module

def is_partitioned(tensor: torch.Tensor) -> bool:
    """A ZeRO-3 parameter built under deepspeed.zero.Init: its data lives in `ds_tensor`, this rank's partition."""
    return hasattr(tensor, "ds_tensor")


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.ds_shape) if is_partitioned(tensor) else tuple(tensor.shape)


def targets(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of `module` holds, by state_dict name: parameters and persistent buffers."""
    return dict(module.state_dict(keep_vars=True))


@torch.no_grad()
def assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy `value` (a full tensor, e.g. a view on a mapped file) into `target`, cast to the target's dtype. A
    ZeRO-3 parameter receives only this rank's slice of the flattened value: ZeRO-3 partitions a parameter into
    equal contiguous chunks of its flattened data, rank r holding chunk r (the last one padded), so no rank
    ever holds more of it than its own chunk and no collective runs."""
    if not is_partitioned(target):
        target.copy_(value)
        return
    if target.numel() == target.ds_numel:   # gathered now (ZeRO-3 keeps small parameters whole): the live copy too
        target.data.copy_(value)
    part = target.ds_tensor
    group = getattr(target, "ds_process_group", None)
    start = part.ds_numel * dist.get_rank(group=group)
    count = max(0, min(part.ds_numel, target.ds_numel - start))
    if count:
        part.narrow(0, 0, count).copy_(value.reshape(-1).narrow(0, start, count))


def stream_into(module: nn.Module, source: TensorSource, names: Mapping[str, str]) -> int:
    """Copy source tensor `names[key]` into each of the module's `key`s, one tensor at a time; shapes checked.
    Returns the number of tensors copied."""
    own = targets(module)
    for key, name in names.items():
        shape, expected = source.shape(name), full_shape(own[key])
        if shape != expected:
            raise BadInput(f"{source.where}: {name} has shape {shape} but the model expects {expected} for {key}; "
                           f"build the model from the same config the weights were saved with")
        assign(own[key], source.tensor(name))
    return len(names)
