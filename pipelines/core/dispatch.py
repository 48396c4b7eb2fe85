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

No silent hang: a ``Watchdog`` sees every sign of progress -- a batch of rows arriving, a task
finishing -- and when none came for ``stall_timeout`` seconds the run stops with a ``StallError``
(one line, exit 2) naming the stage and the shard it waits for: a scoring or diffusion actor whose
forward never returns, an actor that dies on every attempt (Ray restarts it and retries, forever),
a writer stuck on storage. Committed shards stay committed; a rerun resumes. The dataset is
consumed on a thread of its own, so that the driver can wait for it with a timeout.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from shardsmith.errors import RunError

SENTINEL = -1
DEFAULT_STALL_TIMEOUT = 1800.0  # seconds (Ray Data's own no-progress limit is 30 minutes too)


class StallError(RunError):
    """Nothing progressed for ``stall_timeout`` seconds."""


class Watchdog:
    def __init__(self, limit: float = DEFAULT_STALL_TIMEOUT, clock: Callable[[], float] = time.monotonic):
        if not limit > 0:
            raise RunError(f"stall_timeout: must be > 0 seconds, got {limit}")
        self.limit, self.clock = float(limit), clock
        self.last = clock()

    def progress(self) -> None:
        self.last = self.clock()

    def left(self) -> float:
        return self.limit - (self.clock() - self.last)

    def stalled(self) -> bool:
        return self.left() <= 0

    def error(self, what: str) -> StallError:
        return StallError(f"no progress for {self.limit:g} s (stall_timeout): {what}; committed shards are kept: "
                          "rerun the same command to resume (or raise --stall-timeout if this stage is just slow)")


class ShardCollector:
    def __init__(self, expected: dict[str, int] | None = None):
        self.parts: dict[str, list[pa.Table]] = defaultdict(list)
        self.seen: dict[str, int] = defaultdict(int)
        self.totals: dict[str, int] = dict(expected or {})
        self.finished: set[str] = set()  # shards handed on complete

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
                self.finished.add(name)
                parts = self.parts.pop(name, [])
                table = pa.concat_tables(parts, promote_options="permissive") if parts else None
                done.append((name, table.sort_by("row") if table is not None else None))
                self.totals.pop(name)
        return added, done

    def incomplete(self) -> list[str]:
        return sorted(set(self.parts) | set(self.totals))

    def waiting_for(self, names: list[str] | None = None, shown_max: int = 3) -> str:
        """The shards still expected, for a stall message: those begun (with their counts), then
        those with no row yet, the first ``shown_max`` of them named."""
        begun = [n for n in sorted(self.seen) if n not in self.finished]
        not_begun = [n for n in (names or []) if n not in self.seen]
        shown = [f"shard {n} ({self.seen[n]} of {self.totals.get(n, '?')} rows received)" for n in begun]
        shown += [f"shard {n} (no row received yet)" for n in not_begun]
        if not shown:
            return "the rest of its rows"
        more = len(shown) - shown_max
        return ", ".join(shown[:shown_max]) + (f" and {more} more shard(s)" if more > 0 else "")


class Dispatcher:
    """Ray tasks, at most ``window`` in flight. ``on_done(result, tag)`` is called for each
    finished task in completion order (``tag``: what ``submit`` was given with it); the first
    task error is raised from ``submit``, ``poll`` or ``drain``. While it waits for a task, no task
    finishing for ``stall_timeout`` seconds raises ``StallError`` naming ``stage`` and the shard
    (``name``) of the oldest task in flight."""

    def __init__(self, window: int, on_done: Callable[[object, object], None] | None = None,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT, stage: str = "write"):
        self.window = max(1, int(window))
        self.on_done = on_done
        self.stage = stage
        self.watchdog = Watchdog(stall_timeout)
        self.inflight: dict = {}  # ObjectRef -> (tag, name)

    def submit(self, ref, tag=None, name: str | None = None) -> None:
        while len(self.inflight) >= self.window:
            self._wait()
        if not self.inflight:
            self.watchdog.progress()  # the clock of a task starts when it is submitted to an idle window
        self.inflight[ref] = (tag, name)

    def poll(self) -> None:
        """Collect what has finished, without waiting."""
        self._collect(timeout=0)

    def drain(self, poll_every: float = 5.0) -> None:
        while self.inflight:
            self._wait(poll_every)

    def _wait(self, poll_every: float = 5.0) -> None:
        """Wait (a bounded while) for a task to finish; ``StallError`` when none did in time."""
        if self.watchdog.stalled():
            names = [n for _, n in self.inflight.values() if n]
            shown = f"shard {names[0]}" if names else "a task"
            others = f" ({len(self.inflight)} task(s) in flight)" if len(self.inflight) > 1 else ""
            raise self.watchdog.error(f"the {self.stage} of {shown} has not finished{others}")
        self._collect(timeout=max(0.05, min(poll_every, self.watchdog.left())), one=True)

    def _collect(self, timeout: float, one: bool = False) -> None:
        if not self.inflight:
            return
        import ray

        refs = list(self.inflight)
        ready, _ = ray.wait(refs, num_returns=1 if one else len(refs), timeout=timeout)
        if one and ready:  # collect the others that are done too
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            tag, _ = self.inflight.pop(ref)
            result = ray.get(ref)  # raises the task's error, if any
            self.watchdog.progress()
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


class _Feed:
    """The batches of a dataset, consumed on a thread of their own and handed over one at a time:
    the driver waits for the next one with a timeout (``get``), however long Ray takes."""

    _END = object()

    def __init__(self, batches):
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(batches,), name="shardsmith-feed", daemon=True)
        self.thread.start()

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self, batches) -> None:
        try:
            for batch in batches:
                if self.stop.is_set():
                    return
                self._put(("batch", batch))
        except BaseException as e:  # handed to the driver, raised there
            self._put(("error", e))
            return
        self._put(("end", None))

    def get(self, timeout: float):
        """A batch, ``_Feed._END``, or None when none came within ``timeout``; raises the
        dataset's error."""
        try:
            kind, item = self.q.get(timeout=timeout)
        except queue.Empty:
            return None
        if kind == "error":
            raise item
        return item if kind == "batch" else self._END

    def close(self) -> None:
        self.stop.set()


def stop_dataset(ds, error: BaseException | None = None) -> None:
    """Shut a dataset's running execution down (its actors too) from the driver's main thread, so
    that a feed blocked on it ends while Ray is still up. Ray Data 2.60 keeps the executor of a
    dataset being iterated in ``Dataset._current_executor``; without it, nothing is done."""
    executor = getattr(ds, "_current_executor", None)
    if executor is not None:
        try:
            executor.shutdown(force=True, exception=error if isinstance(error, Exception) else None)
        except Exception:
            pass


def stream_to_writers(batches, collector: ShardCollector, submit: Callable[[str, pa.Table | None], object],
                      dispatcher: Dispatcher, progress=None, stage: str = "score", names: list[str] | None = None,
                      on_stop: Callable[[BaseException], None] | None = None) -> None:
    """Consume ``batches``; hand each complete shard's rows to ``submit`` (returning the Ray
    ObjectRef of its writer task) through ``dispatcher``; wait for every writer. ``stage`` and
    ``names`` (the shards to do, in order) name what a stall waits for; ``on_stop(error)`` stops
    the dataflow when the driver gives up on it (a stall, a writer's error, Ctrl-C)."""
    watchdog = dispatcher.watchdog
    watchdog.progress()
    feed = _Feed(batches)
    try:
        while True:
            batch = feed.get(timeout=max(0.05, min(1.0, watchdog.left())))
            if batch is None:
                dispatcher.poll()  # a writer finishing is progress too
                if watchdog.stalled():
                    raise watchdog.error(f"no rows came out of the {stage} stage; waiting for "
                                         f"{collector.waiting_for(names)}")
                continue
            if batch is _Feed._END:
                break
            watchdog.progress()
            added, done = collector.add(batch)
            if progress:
                progress.update(rows=added)
            for name, table in done:
                dispatcher.submit(submit(name, table), tag=table.num_rows if table is not None else 0, name=name)
            dispatcher.poll()
    except BaseException as e:
        feed.close()
        if on_stop is not None:
            on_stop(e)
            feed.thread.join(timeout=10)
        raise
    finally:
        feed.close()
    missing = collector.incomplete()
    if missing:
        raise RuntimeError(f"shard(s) ended without all their rows: {', '.join(missing[:10])}")
    dispatcher.drain()
    if progress:
        progress.close()
