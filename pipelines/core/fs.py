"""fsspec helpers: every path in shardsmith is an fsspec URL (local path, file://, s3://, gs://,
http(s)://, memory://). Globs and brace patterns are expanded here; a file under its final name is
always complete: on a filesystem it is written under a temporary name and moved into place; on an
object store (s3://, gs://, az://) it is written to a local spool file and uploaded in one PUT (an
object appears whole or not at all), so a failed upload can simply be sent again.

What can go wrong with storage is handled here, once, for every job:

- **object-store faults** (503 SlowDown, 500, resets, timeouts): every operation -- list, exists,
  read, each read of a streamed file, upload, remove -- is retried with exponential backoff and
  full jitter (``RetryPolicy``: attempts and base delay from ``SHARDSMITH_STORAGE_ATTEMPTS`` /
  ``SHARDSMITH_STORAGE_BACKOFF``, default 6 attempts from 0.5 s, at most 10 s apart). The S3
  client's own retry layers are turned off for the filesystems opened here (botocore
  ``total_max_attempts: 1``, s3fs ``retries: 1``) unless the user's fsspec config sets them, so
  this is the one budget. When it is spent: ``StorageError``, one line naming the URL and the last
  failure (exit 2); committed shards stay committed and a rerun resumes;
- **a full disk** (ENOSPC, EDQUOT, EFBIG), of OUTPUT's filesystem or of the local spool: the
  temporary file is removed, nothing is moved into place, ``StorageFullError`` names the path and
  the free space (exit 2); after space is freed a rerun resumes.
"""

from __future__ import annotations

import errno
import os
import posixpath
import random
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Callable, Iterator, TypeVar

import fsspec
from braceexpand import braceexpand
from fsspec.core import split_protocol
from fsspec.core import url_to_fs as _fsspec_url_to_fs

from shardsmith.errors import RunError

T = TypeVar("T")
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class StorageError(RunError):
    """Storage kept failing (after the retries), or is full: one line, exit 2, a rerun resumes."""


class StorageFullError(StorageError):
    """No space left where a file was being written."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # in all, the first one included
    base: float = 0.5  # seconds: the n-th wait is uniform in [0, min(cap, base * 2**(n-1))]
    cap: float = 10.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        return cls(attempts=max(1, int(os.environ.get("SHARDSMITH_STORAGE_ATTEMPTS", cls.attempts))),
                   base=float(os.environ.get("SHARDSMITH_STORAGE_BACKOFF", cls.base)))

    def delay(self, attempt: int) -> float:
        """Full jitter: retries of many tasks that failed together do not come back together."""
        return random.uniform(0.0, min(self.cap, self.base * 2 ** (attempt - 1)))


_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
                    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                    "OperationAborted", "503", "500", "502", "504"}
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
                     errno.EPIPE, errno.EAGAIN, getattr(errno, "EREMOTEIO", errno.EIO)}
_TRANSIENT_NAMES = {"ConnectionClosedError", "EndpointConnectionError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ResponseStreamingError", "IncompleteReadError", "ProxyConnectionError", "HTTPClientError",
                    "ClientOSError", "ServerDisconnectedError", "ClientPayloadError", "ServerTimeoutError",
                    "ClientConnectorError", "IncompleteRead", "FSTimeoutError", "ProtocolError"}


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_transient(e: BaseException) -> bool:
    """A failure a later attempt can change: throttling, 5xx, resets, timeouts."""
    for x in _chain(e):
        if isinstance(x, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(x, OSError) and x.errno in NO_SPACE:
            return False
        resp = getattr(x, "response", None)
        if isinstance(resp, dict):
            code = str(resp.get("Error", {}).get("Code", ""))
            status = str(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _TRANSIENT_CODES or status in _TRANSIENT_CODES:
                return True
        if type(x).__name__ in _TRANSIENT_NAMES or isinstance(x, (TimeoutError, ConnectionError)):
            return True
        if isinstance(x, OSError) and x.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def _no_space(e: BaseException) -> OSError | None:
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in NO_SPACE:
            return x
    return None


def describe(e: BaseException) -> str:
    """The failure in a few words: the store's error code and status when it sent one."""
    for x in _chain(e):
        resp = getattr(x, "response", None)
        if isinstance(resp, dict) and resp.get("Error"):
            err = resp["Error"]
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return f"{err.get('Code')} ({status}): {err.get('Message', '')}".strip()
    return " ".join(f"{type(e).__name__}: {e}".split())


def full_disk_error(url: str, e: OSError, spool: str | None = None) -> StorageFullError:
    where = spool or url
    local = where if "://" not in where or where.startswith("file://") else None
    free = ""
    if local:
        d = os.path.dirname(local.removeprefix("file://")) or "."
        while d and not os.path.exists(d):
            d = os.path.dirname(d)
        try:
            free = f"; {shutil.disk_usage(d).free / 1e6:.1f} MB free on the filesystem of {d}"
        except OSError:
            pass
    what = f"the local spool {spool} (uploading {url})" if spool else url
    hint = " (or set SHARDSMITH_SPOOL_DIR to a larger folder)" if spool else ""
    return StorageFullError(f"no space left on device writing {what} ({os.strerror(e.errno)}{free}); nothing of "
                            f"it was committed: free some space{hint} and rerun the same command to resume")


def with_retries(what: str, url: str, fn: Callable[[], T], policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried while it fails transiently, within ``policy``; a spent budget is a
    ``StorageError`` (one line), a full disk a ``StorageFullError``, anything else raised as it is."""
    policy = policy or RetryPolicy.from_env()
    t0 = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:
            full = _no_space(e)
            if full is not None:
                raise full_disk_error(url, full) from e
            if not is_transient(e):
                raise
            if attempt == policy.attempts:
                raise StorageError(f"{url}: {what} kept failing: {describe(e)} (after {attempt} attempts over "
                                   f"{time.monotonic() - t0:.0f} s); committed shards are kept, rerun the same "
                                   "command to resume") from e
            sleep(policy.delay(attempt))
    raise AssertionError("unreachable")


def _client_options(url: str) -> dict:
    """Storage options for the filesystems opened here: for S3, botocore's own retries off (the
    user's fsspec config -- ``FSSPEC_S3`` or fsspec's config files -- wins where it sets them)."""
    proto = split_protocol(url)[0]
    if proto not in ("s3", "s3a"):
        return {}
    client = dict(fsspec.config.conf.get("s3", {}).get("config_kwargs") or {})
    client.setdefault("retries", {"total_max_attempts": 1})
    return {"config_kwargs": client}


def url_to_fs(url: str):
    fs, path = _fsspec_url_to_fs(url, **_client_options(url))
    if protocol_of_fs(fs) in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own loop (no jitter) off: ``with_retries`` is the budget
    return fs, path


def is_object_store(fs) -> bool:
    return protocol_of_fs(fs) in OBJECT_STORES

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
            found = with_retries("listing", pat, lambda: [p for p in sorted(fs.glob(path)) if not fs.isdir(p)])
            out.extend(unstrip(fs, p) for p in found)
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
    names = with_retries("listing", directory, lambda: sorted(fs.ls(path, detail=False)))
    return [unstrip(fs, p) for p in names if p.endswith(suffixes)]


def exists(url: str) -> bool:
    fs, path = fresh_fs(url)
    return with_retries("checking", url, lambda: fs.exists(path))


def isdir(url: str) -> bool:
    fs, path = fresh_fs(url)
    return with_retries("checking", url, lambda: fs.isdir(path))


def size(url: str) -> int:
    fs, path = fresh_fs(url)
    return with_retries("checking", url, lambda: fs.size(path))


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    return with_retries("reading", url, lambda: fs.cat_file(path))


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def open_file(url: str, mode: str = "rb") -> IO:
    """A file object; on an object store, a reader whose every read is retried (``with_retries``)
    from where it stood, so a reset in the middle of a streamed tar does not end the stream."""
    fs, path = url_to_fs(url)
    if "r" in mode and is_object_store(fs):
        return RetryingReader(url, with_retries("opening", url, lambda: fs.open(path, mode)))
    return fs.open(path, mode)


class RetryingReader:
    """A read-only file of an object store: reads retried from the same position."""

    def __init__(self, url: str, f):
        self.url, self._f = url, f
        self._policy = RetryPolicy.from_env()

    def _again(self, fn):
        pos = self._f.tell()

        def attempt():
            if self._f.tell() != pos:
                self._f.seek(pos)
            return fn()

        try:
            return with_retries("reading", self.url, attempt, self._policy)
        except StorageError:
            raise
        except Exception as e:  # the object could not be read: never mistaken for a truncated file
            raise StorageError(f"{self.url}: reading failed at byte {pos}: {describe(e)}") from e

    def read(self, n: int = -1) -> bytes:
        return self._again(lambda: self._f.read(n))

    def readinto(self, b) -> int:
        return self._again(lambda: self._f.readinto(b))

    def seek(self, *args):
        return self._f.seek(*args)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self) -> "RetryingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def makedirs(url: str) -> None:
    fs, path = url_to_fs(url)
    if not is_object_store(fs):  # an object store has no folders (and a bucket is not made on the fly)
        fs.makedirs(path, exist_ok=True)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = fresh_fs(url)

    def rm():
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    with_retries("removing", url, rm)


def tmp_name(final_url: str, tmp_dir: str | None = None) -> str:
    """A unique temporary name for a file that is committed by a move later: in ``tmp_dir`` if
    given (so that readers of the final folder never see it), else beside the final file."""
    d, base = posixpath.split(final_url) if "://" in final_url else os.path.split(final_url)
    return join(tmp_dir or d, f".tmp-{uuid.uuid4().hex[:12]}-{base}")


@contextmanager
def atomic_write(final_url: str, mode: str = "wb", tmp_dir: str | None = None) -> Iterator[IO]:
    """A file object whose content appears under ``final_url`` complete, or not at all.

    Filesystems: written to a temporary name (in ``tmp_dir`` if given) and moved into place.
    Object stores: written to a local spool file, then uploaded in one PUT (retried; an object
    store shows an object whole or not at all). On any error nothing is left but what was there."""
    fs, final = url_to_fs(final_url)
    if is_object_store(fs):
        with _spooled_upload(fs, final_url, final, mode) as f:
            yield f
        return
    tmp_url = tmp_name(final_url, tmp_dir)
    _, tmp = url_to_fs(tmp_url)
    try:
        fs.makedirs(posixpath.dirname(final) or ".", exist_ok=True)
        fs.makedirs(posixpath.dirname(tmp) or ".", exist_ok=True)
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, final)
    except BaseException as e:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        finally:
            full = _no_space(e) if isinstance(e, Exception) else None
            if full is not None and not isinstance(e, StorageFullError):
                raise full_disk_error(final_url, full) from e
            raise


def spool_dir() -> str:
    return os.environ.get("SHARDSMITH_SPOOL_DIR") or tempfile.gettempdir()


@contextmanager
def _spooled_upload(fs, final_url: str, final: str, mode: str) -> Iterator[IO]:
    d = spool_dir()
    fd, spool = tempfile.mkstemp(prefix=".shardsmith-spool-", dir=d)
    try:
        try:
            with os.fdopen(fd, mode) as f:
                yield f
        except OSError as e:
            full = _no_space(e)
            if full is not None:
                raise full_disk_error(final_url, full, spool=spool) from e
            raise
        with_retries("uploading", final_url, lambda: fs.put_file(spool, final))
    finally:
        try:
            os.unlink(spool)
        except FileNotFoundError:
            pass


def write_bytes_atomic(final_url: str, data: bytes, tmp_dir: str | None = None) -> None:
    with atomic_write(final_url, tmp_dir=tmp_dir) as f:
        f.write(data)


__all__ = [
    "StorageError", "StorageFullError", "atomic_write", "exists", "expand", "get_fs", "isdir", "join", "list_files",
    "makedirs", "open_file", "read_bytes", "read_text", "remove", "size", "with_retries", "write_bytes_atomic",
    "fsspec",
]
