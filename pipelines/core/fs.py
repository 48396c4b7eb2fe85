"""fsspec helpers: every path in shardsmith is an fsspec URL (local path, file://, s3://, gs://,
http(s)://, memory://). Globs and brace patterns are expanded here; writes go through a temporary
name and are committed by a move, so a file under its final name is always complete."""

from __future__ import annotations

import os
import posixpath
import uuid
from contextlib import contextmanager
from typing import IO, Iterator

import fsspec
from braceexpand import braceexpand
from fsspec.core import url_to_fs

GLOB_CHARS = set("*?[")


def get_fs(url: str):
    """(filesystem, path-within-filesystem) for a URL."""
    return url_to_fs(url)


def protocol_of(url: str) -> str:
    fs, _ = url_to_fs(url)
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def unstrip(fs, path: str) -> str:
    """Turn a filesystem-internal path back into a URL that fsspec resolves again."""
    return fs.unstrip_protocol(path) if protocol_of_fs(fs) not in ("file", "local") else path


def protocol_of_fs(fs) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def join(base: str, *parts: str) -> str:
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def expand(pattern: str) -> list[str]:
    """Expand brace patterns and globs into a sorted list of existing file URLs.

    A plain path that is a directory is not expanded here (callers decide what a directory means).
    """
    out: list[str] = []
    for pat in braceexpand(pattern):
        fs, path = url_to_fs(pat)
        if any(c in path for c in GLOB_CHARS):
            out.extend(unstrip(fs, p) for p in sorted(fs.glob(path)) if not fs.isdir(p))
        else:
            out.append(pat)
    return out


def fresh_fs(url: str):
    """(filesystem, path) with the filesystem's listing cache for ``path`` dropped.

    Object-store filesystems (s3fs, gcsfs) cache directory listings per process, forever by
    default; the files of a run are written by other processes (Ray tasks), so a listing the driver
    cached earlier would hide them (a resumed run on s3:// then saw its new ledger entries as
    missing)."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)
    return fs, path


def list_files(directory: str, suffixes: tuple[str, ...]) -> list[str]:
    fs, path = fresh_fs(directory)
    return [unstrip(fs, p) for p in sorted(fs.ls(path, detail=False)) if p.endswith(suffixes)]


def exists(url: str) -> bool:
    fs, path = fresh_fs(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = fresh_fs(url)
    return fs.isdir(path)


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    return fs.cat_file(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def open_file(url: str, mode: str = "rb") -> IO:
    fs, path = url_to_fs(url)
    return fs.open(path, mode)


def makedirs(url: str) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def tmp_name(final_url: str, tmp_dir: str | None = None) -> str:
    """A unique temporary name for a file that is committed by a move later: in ``tmp_dir`` if
    given (so that readers of the final folder never see it), else beside the final file."""
    d, base = posixpath.split(final_url) if "://" in final_url else os.path.split(final_url)
    return join(tmp_dir or d, f".tmp-{uuid.uuid4().hex[:12]}-{base}")


@contextmanager
def atomic_write(final_url: str, mode: str = "wb", tmp_dir: str | None = None) -> Iterator[IO]:
    """Write to a temporary name, then move it to ``final_url``; on error the temp is removed."""
    fs, final = url_to_fs(final_url)
    tmp_url = tmp_name(final_url, tmp_dir)
    _, tmp = url_to_fs(tmp_url)
    fs.makedirs(posixpath.dirname(final) or ".", exist_ok=True)
    fs.makedirs(posixpath.dirname(tmp) or ".", exist_ok=True)
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, final)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        finally:
            raise


def write_bytes_atomic(final_url: str, data: bytes, tmp_dir: str | None = None) -> None:
    with atomic_write(final_url, tmp_dir=tmp_dir) as f:
        f.write(data)


__all__ = [
    "atomic_write", "exists", "expand", "get_fs", "isdir", "join", "list_files",
    "makedirs", "open_file", "read_bytes", "read_text", "remove", "write_bytes_atomic", "fsspec",
]
