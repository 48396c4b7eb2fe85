"""The driver side of every job: Ray tasks in a bounded window, and the rows of a streaming
dataset gathered per shard.

- ``Dispatcher``: at most ``window`` tasks in flight; ``submit`` waits while the window is full,
  and each finished task's result (its ledger entry) is handed on as it completes -- a task's error
  is raised at once. Metadata mode and download submit one task per shard through it; the
  streaming jobs submit their writer tasks through it.
- ``ShardCollector`` + ``stream_to_writers``: a streaming dataset's rows are gathered per shard and
  each complete shard goes to a writer task.

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


class Dispatcher:
    """Ray tasks, at most ``window`` in flight. ``on_done(result, tag)`` is called for each
    finished task in completion order (``tag``: what ``submit`` was given with it); the first
    task error is raised from ``submit``, ``poll`` or ``drain``."""

    def __init__(self, window: int, on_done: Callable[[object, object], None] | None = None):
        self.window = max(1, int(window))
        self.on_done = on_done
        self.inflight: dict = {}  # ObjectRef -> tag

    def submit(self, ref, tag=None) -> None:
        while len(self.inflight) >= self.window:
            self._collect(timeout=None)
        self.inflight[ref] = tag

    def poll(self) -> None:
        """Collect what has finished, without waiting."""
        self._collect(timeout=0)

    def drain(self, poll_every: float = 5.0) -> None:
        while self.inflight:
            self._collect(timeout=poll_every)

    def _collect(self, timeout: float | None) -> None:
        import ray

        if not self.inflight:
            return
        refs = list(self.inflight)
        if timeout is None:
            ready, _ = ray.wait(refs, num_returns=1)
        else:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in ready:
            tag = self.inflight.pop(ref)
            result = ray.get(ref)  # raises the task's error, if any
            if self.on_done:
                self.on_done(result, tag)


def progress_on_commit(progress):
    """``on_done`` for tasks that return a shard's ledger entry: counts the shard, and the rows its
    entry accounts for beyond those already counted as they streamed past (``tag``) -- a writer may
    account for rows that never passed through the dataflow (urls mode's failed downloads, an
    index's rows without a sample)."""
    def on_done(entry, counted) -> None:
        if progress is None:
            return
        rows_read = entry.get("rows_read") if isinstance(entry, dict) else None
        progress.update(rows=max(0, rows_read - (counted or 0)) if isinstance(rows_read, int) else 0, shards=1)

    return on_done


def stream_to_writers(batches, collector: ShardCollector, submit: Callable[[str, pa.Table | None], object],
                      dispatcher: Dispatcher, progress=None) -> None:
    """Consume ``batches``; hand each complete shard's rows to ``submit`` (returning the Ray
    ObjectRef of its writer task) through ``dispatcher``; wait for every writer."""
    for batch in batches:
        added, done = collector.add(batch)
        if progress:
            progress.update(rows=added)
        for name, table in done:
            dispatcher.submit(submit(name, table), tag=table.num_rows if table is not None else 0)
        dispatcher.poll()
    missing = collector.incomplete()
    if missing:
        raise RuntimeError(f"shard(s) ended without all their rows: {', '.join(missing[:10])}")
    dispatcher.drain()
    if progress:
        progress.close()
