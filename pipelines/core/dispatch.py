"""The driver side of every job: gather a streaming dataset's rows per shard, and hand each
complete shard to a Ray writer task that writes and commits it.

Rows carry ``shard`` and ``row``. A shard's size is either known up front (``expected``) or
announced by one sentinel row (``row == -1``) whose ``shard_rows`` column holds the count, so a
shard is complete when that many rows have arrived, in whatever order Ray delivered them. Only
small rows should reach the driver (scores, keys; generated PNGs are the one exception).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

SENTINEL = -1


class ShardCollector:
    def __init__(self, expected: dict[str, int] | None = None):
        self.parts: dict[str, list[pa.Table]] = defaultdict(list)
        self.seen: dict[str, int] = defaultdict(int)
        self.totals: dict[str, int] = dict(expected or {})

    def add(self, batch: pa.Table) -> tuple[int, list[tuple[str, pa.Table]]]:
        """Add a batch; returns (real rows added, [(shard, its rows without sentinel, by row)])."""
        done: list[tuple[str, pa.Table]] = []
        added = 0
        shard_col = batch.column("shard")
        for name in pc.unique(shard_col).to_pylist():
            sub = batch.filter(pc.equal(shard_col, name))
            rows = sub.column("row")
            is_sentinel = pc.equal(rows, SENTINEL)
            n_sentinel = int(pc.sum(is_sentinel).as_py() or 0)
            if n_sentinel:
                self.totals[name] = int(pc.max(sub.filter(is_sentinel).column("shard_rows")).as_py())
                sub = sub.filter(pc.invert(is_sentinel))
            if sub.num_rows:
                self.parts[name].append(sub)
            self.seen[name] += sub.num_rows
            added += sub.num_rows
            if name in self.totals and self.seen[name] > self.totals[name]:
                raise RuntimeError(f"shard {name}: got {self.seen[name]} rows, expected {self.totals[name]}")
            if name in self.totals and self.seen[name] == self.totals[name]:
                parts = self.parts.pop(name, [])
                table = pa.concat_tables(parts, promote_options="permissive") if parts else None
                done.append((name, table.sort_by("row") if table is not None else None))
                self.totals.pop(name)
        return added, done

    def incomplete(self) -> list[str]:
        return sorted(set(self.parts) | set(self.totals))


def drive(batches, collector: ShardCollector, submit: Callable[[str, pa.Table | None], object],
          progress=None, poll_every: float = 5.0) -> None:
    """Consume ``batches``; submit a writer (returning a Ray ObjectRef) per complete shard; wait for
    every writer, raising the first writer error. Progress counts rows and committed shards: a
    writer that returns its ledger entry may account for rows that never passed through the
    dataflow (urls mode's failed downloads, an index's rows without a sample); its ``rows_read``
    tops the count up."""
    import ray

    inflight: dict = {}  # writer ref -> rows of its shard already counted

    def collect(timeout: float) -> None:
        if not inflight:
            return
        ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=timeout)
        for ref in ready:
            counted = inflight.pop(ref)
            entry = ray.get(ref)  # raises the writer's error, if any
            if progress:
                rows_read = entry.get("rows_read") if isinstance(entry, dict) else None
                progress.update(rows=max(0, rows_read - counted) if isinstance(rows_read, int) else 0, shards=1)

    for batch in batches:
        added, done = collector.add(batch)
        if progress:
            progress.update(rows=added)
        for name, table in done:
            inflight[submit(name, table)] = table.num_rows if table is not None else 0
        collect(0)
    missing = collector.incomplete()
    if missing:
        raise RuntimeError(f"shard(s) ended without all their rows: {', '.join(missing[:10])}")
    while inflight:
        collect(poll_every)
    if progress:
        progress.update(force=True)
