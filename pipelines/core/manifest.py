"""The run manifest: what a run is, checked when it is resumed.

``OUTPUT/manifest.json`` holds the tool, the settings fingerprint (what decides the outputs: a
rerun must match it to resume), the config, the models, the inputs and the package versions.
Credentials a URL may carry are redacted before anything is written.
"""

from __future__ import annotations

import json
import re
import time
import uuid

from shardsmith.errors import RunError, version
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.core.layout import TMP_DIR, OutputLayout


def read_manifest(url: str) -> dict | None:
    """The manifest of the run in OUTPUT ``url``, or None when there is none."""
    path = OutputLayout(url).manifest
    if not fsutil.exists(path):
        return None
    return json.loads(fsutil.read_text(path))


def check_writable(layout: OutputLayout) -> None:
    probe = layout.path(TMP_DIR, f".probe-{uuid.uuid4().hex[:8]}")
    try:
        fsutil.write_bytes_atomic(probe, b"ok", tmp_dir=layout.tmp_dir)
        fsutil.remove(probe)
    except Exception as e:
        raise RunError(f"{layout.root}: output location is not writable: {type(e).__name__}: {e}") from e


def open_run(layout: OutputLayout, tool: str, fingerprint: dict, config: dict, models: dict, inputs: list,
              overwrite: bool, parts: tuple[str, ...], parent: dict | None = None) -> dict:
    """Check an existing run manifest against this run's settings (resume needs the same ones),
    or remove the earlier run's outputs (``parts``) with ``overwrite``; then write the manifest
    (with ``parent``: the run this one was derived from, its lineage)."""
    fingerprint = redact(fingerprint)
    if overwrite:
        for part in parts:
            fsutil.remove(layout.path(part), recursive=True)
    elif fsutil.exists(layout.manifest):
        old = json.loads(fsutil.read_text(layout.manifest)).get("fingerprint", {})
        if old != fingerprint:
            diff = sorted(k for k in set(fingerprint) | set(old) if fingerprint.get(k) != old.get(k))
            raise RunError(
                f"{layout.root} holds a run made with other settings ({', '.join(diff)} differ); "
                "rerun with the same settings to resume, pass --overwrite to redo it, or use a new OUTPUT")
    check_writable(layout)
    manifest = {"tool": tool, "version": shardsmith_version(), "fingerprint": redact(fingerprint),
                "config": redact(config), "models": redact(models), "inputs": redact(inputs),
                "packages": package_versions(), "started_at": time.time()}
    if parent is not None:
        manifest["parent"] = redact(parent)
    write_json(layout.manifest, manifest, tmp_dir=layout.tmp_dir)
    return manifest


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SECRET_PARAM = re.compile(r"(?i)([?&](?:x-amz-[a-z-]*|signature|sig|token|key|access_key|secret|password)=)[^&\s]+")


def redact(obj):
    """Remove credentials a URL may carry (user:password@, signed-URL parameters) before anything
    is written to a manifest or a log."""
    if isinstance(obj, str):
        return _SECRET_PARAM.sub(r"\1REDACTED", _USERINFO.sub(r"\g<scheme>REDACTED@", obj))
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def shardsmith_version() -> str:
    return version()


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", "torchvision", "open_clip_torch", "ray", "pyarrow", "fsspec", "pillow", "numpy",
              "diffusers", "transformers", "webdataset", "invisible-watermark"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def write_json(url: str, data: dict, tmp_dir: str | None = None) -> None:
    fsutil.write_bytes_atomic(url, (json.dumps(data, indent=1, sort_keys=False) + "\n").encode(), tmp_dir=tmp_dir)
