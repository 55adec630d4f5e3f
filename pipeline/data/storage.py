"""Local folders and s3:// URIs behind one small API, built on pyarrow filesystems."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

from pipeline.errors import MissingInput, UserError

_S3 = "s3://"
_FILE = "file://"
T = TypeVar("T")


@dataclass(frozen=True)
class S3Options:
    """Retries and timeouts of every S3 call (the filesystem object carries them into Ray workers)."""

    # AWS "standard" retries back off exponentially (base 0.1 s, capped at 20 s): 5 attempts ride out a
    # throttled or restarting endpoint in ~10 s and still fail within a minute when it is really gone.
    max_attempts: int = 5
    connect_timeout: float = 5.0  # seconds to open a TCP connection
    request_timeout: float = 60.0  # seconds per request: a 25 MB shard over a slow link still fits


S3_OPTIONS = S3Options()


class StorageUnreachable(UserError, ConnectionError):
    """The S3 endpoint did not answer after every retry."""


def is_s3(uri: str) -> bool:
    return uri.startswith(_S3)


def has_scheme(uri: str) -> bool:
    """s3://, file:// ...: a location that means the same from any working directory (a bare path does not)."""
    return "://" in uri


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"


def _s3_filesystem(options: S3Options) -> pafs.S3FileSystem:
    """An S3 filesystem; credentials come from the standard AWS chain and are never read here."""
    kwargs: dict[str, object] = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
        "connect_timeout": options.connect_timeout,
        "request_timeout": options.request_timeout,
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        # pyarrow wants "host:port" plus a scheme; MinIO/moto endpoints are usually plain http.
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host.rstrip("/") if host else endpoint.rstrip("/")
        kwargs["scheme"] = "http" if scheme == "http" else "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it): s3://bucket/key -> bucket/key; a local path -> an absolute path."""
    if not uri:
        raise ValueError("empty storage URI; give a local folder such as runs/smoke/shards or s3://bucket/prefix")
    if is_s3(uri):
        path = uri[len(_S3):].strip("/")
        if not path:
            raise ValueError(f"{uri!r} names no bucket; write s3://bucket/prefix")
        return _s3_filesystem(S3_OPTIONS), path
    if has_scheme(uri) and not uri.startswith(_FILE):
        raise ValueError(f"{uri!r}: unsupported scheme; use a local path, file:// or s3://")
    local = uri[len(_FILE):] if uri.startswith(_FILE) else uri
    return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())


def _is_network_error(exc: OSError) -> bool:
    # pyarrow reports every AWS SDK failure as a plain OSError; these markers mean "no usable answer": no
    # connection, a timeout, or a 5xx (a restarting or throttling server) still there after every retry.
    text = str(exc)
    return any(m in text for m in ("NETWORK_CONNECTION", "curlCode", "Could not connect", "timed out",
                                   "HTTP status 5"))


@contextmanager
def reaching(uri: str) -> Iterator[None]:
    """Turn 'endpoint unreachable after all retries' into one error naming the URI, endpoint and fix."""
    try:
        yield
    except OSError as exc:
        if not is_s3(uri) or isinstance(exc, FileNotFoundError) or not _is_network_error(exc):
            raise
        raise StorageUnreachable(
            f"cannot reach {_endpoint()} for {uri} after {S3_OPTIONS.max_attempts} attempts "
            f"(connect timeout {S3_OPTIONS.connect_timeout:g} s): {exc}. Check AWS_ENDPOINT_URL, that the "
            f"S3 server is up and that this machine can reach it") from None


def _call(uri: str, fn: Callable[[pafs.FileSystem, str], T]) -> T:
    fs, path = resolve(uri)
    with reaching(uri):
        return fn(fs, path)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI without resolving it (s3 keys always use '/')."""
    if is_s3(uri) or uri.startswith(_FILE):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri, *parts))


def exists(uri: str) -> bool:
    return _call(uri, lambda fs, path: fs.get_file_info(path).type != pafs.FileType.NotFound)


def write_bytes(uri: str, data: bytes) -> None:
    def write(fs: pafs.FileSystem, path: str) -> None:
        if isinstance(fs, pafs.LocalFileSystem):
            # S3 has no directories; local files need their parent folder.
            fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(data)

    _call(uri, write)


def read_bytes(uri: str) -> bytes:
    def read(fs: pafs.FileSystem, path: str) -> bytes:
        with fs.open_input_stream(path) as src:
            return src.read()

    try:
        return _call(uri, read)
    except FileNotFoundError:
        raise MissingInput(f"{uri} does not exist; check the URI or run the stage that writes it") from None


def upload_file(local: str | Path, uri: str, chunk: int = 64 << 20) -> None:
    """Copy one local file to a local path or under s3://, in chunks: a 14 GB checkpoint never sits in memory."""
    def copy(fs: pafs.FileSystem, path: str) -> None:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(posixpath.dirname(path), recursive=True)
        with open(local, "rb") as src, fs.open_output_stream(path) as out:
            while data := src.read(chunk):
                out.write(data)

    _call(uri, copy)


def copy_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder's contents (recursively) into a local folder or under an s3:// prefix."""
    src = Path(local_dir)
    if not src.is_dir():
        raise MissingInput(f"{src} is not a folder; nothing to copy to {uri}")

    def copy(fs: pafs.FileSystem, path: str) -> None:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(path, recursive=True)
        pafs.copy_files(str(src.resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)

    _call(uri, copy)


def list_files(uri: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """Files inside a folder (and its subfolders if recursive) whose names end with suffix, as sorted
    URIs of the same kind."""
    def listing(fs: pafs.FileSystem, path: str) -> list[str]:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
        return sorted(posixpath.relpath(i.path, path) if recursive else i.base_name for i in infos
                      if i.type == pafs.FileType.File and i.base_name.endswith(suffix))

    return [join(uri, *name.split("/")) for name in _call(uri, listing)]
