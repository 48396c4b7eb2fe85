"""Loading weights safely from local or fsspec paths.

State dicts load only through ``torch.load(weights_only=True)`` or safetensors: a pickle that
needs arbitrary objects is refused with a message saying how to convert it. Remote checkpoints
(s3://, gs://, http://) are copied once per node into a local cache and loaded from there.
"""

from __future__ import annotations

import io
import os
import uuid

import fsspec
import torch
from fsspec.core import url_to_fs

from shardsmith.errors import ConfigError


class WeightsError(ConfigError):
    """A weights file cannot be loaded; the message says which file and why."""


def _protocol(fs) -> str:
    return fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol


def is_local(url: str) -> bool:
    return _protocol(url_to_fs(url)[0]) in ("file", "local")


def local_copy(url: str, cache_dir: str | None = None) -> str:
    """A local file path for ``url``: the path itself if local, else a cached download."""
    fs, path = url_to_fs(url)
    if _protocol(fs) in ("file", "local"):
        if not os.path.exists(path):
            raise WeightsError(f"{url}: file not found")
        return path
    cache_dir = cache_dir or os.environ.get(
        "SHARDSMITH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "shardsmith")
    )
    target = os.path.join(cache_dir, "weights", _protocol(fs), path.lstrip("/"))
    if not os.path.exists(target):
        if not fs.exists(path):
            raise WeightsError(f"{url}: file not found")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        fs.get(path, tmp)
        os.replace(tmp, target)
    return target


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """A state dict of tensors from ``url`` (.safetensors, or a torch file of tensors)."""
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
