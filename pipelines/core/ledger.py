"""The output folder's bookkeeping: the run manifest, the ledger of committed shards, stats.json.

A shard is committed when its ledger entry ``OUTPUT/_ledger/<shard>.json`` exists; the entry is
written last, after every output file of the shard has been moved to its final name. A rerun skips
committed shards and redoes the others, overwriting whatever an interrupted run left.
``stats.json`` is always rebuilt from the ledger, so it never disagrees with it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from shardsmith.pipelines.core import fs as fsutil

LEDGER_DIR = "_ledger"
TMP_DIR = "_tmp"


@dataclass
class OutputLayout:
    root: str

    def path(self, *parts: str) -> str:
        return fsutil.join(self.root, *parts)

    @property
    def ledger_dir(self) -> str:
        return self.path(LEDGER_DIR)

    @property
    def tmp_dir(self) -> str:
        return self.path(TMP_DIR)

    def ledger_entry(self, shard: str) -> str:
        return self.path(LEDGER_DIR, f"{shard}.json")

    @property
    def manifest(self) -> str:
        return self.path("manifest.json")

    @property
    def stats(self) -> str:
        return self.path("stats.json")


class Ledger:
    def __init__(self, layout: OutputLayout):
        self.layout = layout

    def committed(self) -> dict[str, dict]:
        """shard name -> its committed stats entry."""
        d = self.layout.ledger_dir
        if not fsutil.exists(d):
            return {}
        out = {}
        for url in fsutil.list_files(d, (".json",)):
            entry = json.loads(fsutil.read_text(url))
            out[entry["shard"]] = entry
        return out

    def commit(self, shard: str, entry: dict) -> None:
        entry = {"shard": shard, "committed_at": time.time(), **entry}
        fsutil.write_bytes_atomic(self.layout.ledger_entry(shard), json.dumps(entry, indent=1).encode(),
                                  tmp_dir=self.layout.tmp_dir)

    def clean_tmp(self) -> None:
        """Remove what interrupted runs left in the temporary folder."""
        fsutil.remove(self.layout.tmp_dir, recursive=True)


def aggregate(entries: dict[str, dict]) -> dict:
    """Run totals from per-shard stats; kept + dropped + errors == rows_read by construction."""
    total = Counter()
    by_reason, by_kind = Counter(), Counter()
    nodes, scorers = set(), set()
    for e in entries.values():
        nodes.update(e.get("node_ids", []))
        scorers.update(e.get("scored_by", []))
        for k in ("rows_read", "kept", "dropped", "errors"):
            total[k] += e[k]
        by_reason.update(e.get("dropped_by_reason", {}))
        by_kind.update(e.get("errors_by_kind", {}))
    return {
        "rows_read": total["rows_read"],
        "kept": total["kept"],
        "dropped": total["dropped"],
        "dropped_by_reason": dict(sorted(by_reason.items())),
        "errors": total["errors"],
        "errors_by_kind": dict(sorted(by_kind.items())),
        "shards_committed": len(entries),
        "node_ids": sorted(nodes),
        # distinct model-actor processes that scored rows: more than the pool size means actors
        # were restarted after a failure and their work retried
        "scoring_actor_instances": len(scorers),
        "shards": {name: {k: v for k, v in e.items() if k != "shard"} for name, e in sorted(entries.items())},
    }


def shard_stats(status: list[str], reason: list[str | None]) -> dict:
    return shard_stats_from_counts(Counter(zip(status, reason)))


def shard_stats_from_counts(counts: "Counter[tuple[str, str | None]]") -> dict:
    """The stats of a shard from its row counts per (status, reason): what metadata mode
    accumulates batch by batch with Arrow instead of holding millions of Python strings."""
    kept = sum(n for (s, _), n in counts.items() if s == "kept")
    dropped_by = Counter({r: n for (s, r), n in counts.items() if s == "dropped" and n})
    errors_by = Counter({r: n for (s, r), n in counts.items() if s == "error" and n})
    stats = {
        "rows_read": sum(counts.values()),
        "kept": kept,
        "dropped": sum(dropped_by.values()),
        "dropped_by_reason": dict(sorted(dropped_by.items())),
        "errors": sum(errors_by.values()),
        "errors_by_kind": dict(sorted(errors_by.items())),
    }
    assert stats["kept"] + stats["dropped"] + stats["errors"] == stats["rows_read"], stats
    return stats


class RunError(RuntimeError):
    """The output folder cannot take this run (other settings, not writable)."""


def check_writable(layout: OutputLayout) -> None:
    probe = layout.path(TMP_DIR, f".probe-{uuid.uuid4().hex[:8]}")
    try:
        fsutil.write_bytes_atomic(probe, b"ok", tmp_dir=layout.tmp_dir)
        fsutil.remove(probe)
    except Exception as e:
        raise RunError(f"{layout.root}: output location is not writable: {type(e).__name__}: {e}") from e


def start_run(layout: OutputLayout, tool: str, fingerprint: dict, config: dict, models: dict, inputs: list,
              overwrite: bool, parts: tuple[str, ...]) -> dict:
    """Check an existing run manifest against this run's settings (resume needs the same ones),
    or remove the earlier run's outputs (``parts``) with ``overwrite``; then write the manifest."""
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
    try:
        from importlib.metadata import version

        return version("shardsmith")
    except Exception:
        return "0+unknown"


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
