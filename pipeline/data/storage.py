"""Local folders and s3:// URIs behind one small API, built on pyarrow filesystems."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import pyarrow.fs as pafs

_S3 = "s3://"
_FILE = "file://"


def is_s3(uri: str) -> bool:
    return uri.startswith(_S3)


def _s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem; credentials come from the standard AWS chain and are never read here."""
    kwargs: dict[str, str] = {}
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
        return _s3_filesystem(), path
    if "://" in uri and not uri.startswith(_FILE):
        raise ValueError(f"{uri!r}: unsupported scheme; use a local path, file:// or s3://")
    local = uri[len(_FILE):] if uri.startswith(_FILE) else uri
    return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI without resolving it (s3 keys always use '/')."""
    if is_s3(uri) or uri.startswith(_FILE):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri, *parts))


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        # S3 has no directories; local files need their parent folder.
        fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as src:
            return src.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist; check the URI or run the stage that writes it") from None


def copy_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder's contents (recursively) into a local folder or under an s3:// prefix."""
    src = Path(local_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder; nothing to copy to {uri}")
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)
    pafs.copy_files(str(src.resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly inside a folder whose names end with suffix, as sorted URIs of the same kind."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    return [join(uri, name) for name in names]
