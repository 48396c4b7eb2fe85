"""Loading weights safely from local or fsspec paths, and the cache they are fetched into.

State dicts load only through ``torch.load(weights_only=True)`` or safetensors: a pickle that
needs arbitrary objects is refused with a message saying how to convert it. Remote checkpoints
(s3://, gs://, http://) are copied once per node into a local cache and loaded from there.

The cache (``SHARDSMITH_CACHE``, default ``~/.cache/shardsmith``) holds each download under a name
derived from its URL. An entry is written to a temporary name, its sha256 computed while it
streams, checked against the pin when there is one, and only then renamed into place, with a
``.sha256`` note beside it (hash and size). Each entry has a lock file: the processes of one node
(scoring actors, the driver) that want the same file wait for the first one's download instead of
fetching it again, and a node that joins later fetches it once for itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import fsspec
from fsspec.core import url_to_fs

from shardsmith.errors import ConfigError


class WeightsError(ConfigError):
    """A weights file cannot be loaded; the message says which file and why."""


def _protocol(fs) -> str:
    return fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol


def is_local(url: str) -> bool:
    return _protocol(url_to_fs(url)[0]) in ("file", "local")


def cache_root() -> str:
    return os.environ.get("SHARDSMITH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "shardsmith")


_TRUE = ("1", "true", "yes", "on")


def offline_reason() -> str | None:
    """The variable that forbids downloads (``SHARDSMITH_OFFLINE`` or ``HF_HUB_OFFLINE``), if set."""
    for var in ("SHARDSMITH_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    return None


def url_cache_path(url: str, kind: str, cache_dir: str | None = None) -> str:
    """Where ``url`` is cached: ``CACHE/KIND/<host>/<path>`` (the path percent-decoded; a query
    string is not part of the name). A path that climbs out with '..' is refused."""
    parts = urlsplit(url)
    rel = [p for p in unquote(parts.path).split("/") if p not in ("", ".")]
    if ".." in rel or not rel:
        raise WeightsError(f"{url}: cannot be cached (its path is empty or climbs out with '..')")
    host = parts.netloc.rsplit("@", 1)[-1].replace(":", "_") or "_"
    return os.path.join(cache_dir or cache_root(), kind, host, *rel)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_note(target: str) -> tuple[str, int] | None:
    """(sha256, size) recorded when ``target`` was cached, or None."""
    try:
        with open(target + ".sha256") as f:
            sha, size = f.read().split()[:2]
        return sha, int(size)
    except (OSError, ValueError):
        return None


def write_note(target: str, sha: str, size: int) -> None:
    tmp = f"{target}.sha256.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(f"{sha} {size}\n")
    os.replace(tmp, target + ".sha256")


@contextmanager
def entry_lock(target: str):
    """An exclusive lock on one cache entry, shared by every process of this node (flock)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Fetched:
    path: str  # the local file
    sha256: str
    size: int
    downloaded: bool  # False: it was in the cache already


def download_verified(source: str, target: str, sha256: str | None = None, size: int | None = None,
                      what: str = "", url: str | None = None) -> Fetched:
    """Fetch ``source`` (any fsspec URL) into ``target`` through a temporary name, checking its
    size and sha256 when given; nothing is left under ``target`` when a check fails. ``url`` is
    the address named in messages (the original one, when ``source`` is a mirror's)."""
    url = url or source
    label = f"{what}: " if what else ""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    h, n = hashlib.sha256(), 0
    try:
        fs, path = url_to_fs(source)
        kwargs = {"block_size": 0} if _protocol(fs) in ("http", "https") else {}
        with fs.open(path, "rb", **kwargs) as src, open(tmp, "wb") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                n += len(chunk)
                out.write(chunk)
    except FileNotFoundError as e:
        _remove(tmp)
        raise WeightsError(f"{label}{source}: file not found") from e
    except Exception as e:
        _remove(tmp)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise WeightsError(f"{label}cannot download {source}: {type(e).__name__}: {first}") from e
    got = h.hexdigest()
    if size is not None and n != size:
        _remove(tmp)
        raise WeightsError(f"{label}{url} has {n} bytes, expected {size}; refused, nothing cached "
                           f"(sha256 {got}, expected {sha256 or 'no pin'})")
    if sha256 is not None and got != sha256.lower():
        _remove(tmp)
        raise WeightsError(f"{label}{url} has sha256 {got}, expected {sha256.lower()}: refused, nothing cached")
    os.replace(tmp, target)
    write_note(target, got, n)
    return Fetched(target, got, n, True)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def local_copy(url: str, cache_dir: str | None = None) -> str:
    """A local file path for ``url``: the path itself if local, else a cached download (fetched
    once per node: concurrent callers wait on the entry's lock)."""
    fs, path = url_to_fs(url)
    if _protocol(fs) in ("file", "local"):
        if not os.path.exists(path):
            raise WeightsError(f"{url}: file not found")
        return path
    target = os.path.join(cache_dir or cache_root(), "weights", _protocol(fs), path.split("://", 1)[-1].lstrip("/"))
    with entry_lock(target):
        if not os.path.exists(target):
            if not fs.exists(path):
                raise WeightsError(f"{url}: file not found")
            download_verified(url, target)
    return target


def read_state_dict(url: str) -> dict:
    """A state dict of tensors from ``url`` (.safetensors, or a torch file of tensors)."""
    import torch

    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise WeightsError(f"{url}: file not found") from e
    if url.endswith(".safetensors"):
        from safetensors.torch import load as st_load

        try:
            return st_load(data)
        except Exception as e:
            raise WeightsError(f"{url}: not a valid safetensors file: {e}") from e
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle of arbitrary objects, or not a torch file at all
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise WeightsError(
            f"{url}: refused to load: only tensors are accepted (torch.load weights_only=True); "
            f"{type(e).__name__}: {first}. If this is a trusted pickled module, convert it once: "
            "torch.save(torch.load(p, weights_only=False).state_dict(), 'head.pth')"
        ) from e
    for wrapper in ("state_dict", "weights"):  # a checkpoint dict around the state dict (LAION's watermark
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):  # training saved {"weights": ...})
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{url}: expected a state dict of tensors, got {type(obj).__name__}")
    return obj
