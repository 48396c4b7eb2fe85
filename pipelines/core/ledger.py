"""The ledger of committed shards, and the stats built from it.

A shard is committed when its ledger entry ``OUTPUT/_ledger/<shard>.json`` exists; the entry is
written last, after every output file of the shard has been moved to its final name. A rerun skips
committed shards and redoes the others, overwriting whatever an interrupted run left.
``stats.json`` is always rebuilt from the ledger, so it never disagrees with it.
"""

from __future__ import annotations

import json
import time
from collections import Counter

from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.core.layout import OutputLayout


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

    def uncommit(self, shards: list[str]) -> None:
        """Remove these shards' ledger entries: the next run redoes them (and so does this one)."""
        for name in shards:
            fsutil.remove(self.layout.ledger_entry(name))

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
