"""Peak resident memory of a process tree (the Ray processes of a run), sampled from /proc.

A local Ray started by ``ray.init`` is a tree under the driver: GCS, raylet, dashboard agent, and
every worker and actor as children of the raylet. The sampler sums ``VmRSS`` over the driver and
all of its descendants twice a second and keeps the peak of that sum. Shared pages (the
object store's shared memory, shared libraries) are counted once per process that maps them, so
the sum overstates the machine's real use; it is a consistent yardstick for comparing two runs.
The process list is rescanned every 2 s (workers appear and go), their RSS read every 0.5 s.
Linux only (no psutil in the stack).
"""

from __future__ import annotations

import os
import threading
import time


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_free_heap() -> bool:
    """Collect garbage and give the C heap's free pages back to the OS (glibc ``malloc_trim``), so
    that an RSS read next counts live memory, not what earlier work freed but the allocator kept.
    Without it an idle baseline holds a varying amount of such free memory, which the next run
    reuses without growing its RSS: its "peak over idle" then depends on what ran before it (driver
    increments of 3 to 20 MiB for the same run here) more than on the run. True when trimmed."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc
        return False


def tree_rss(root: int, exclude_root: bool = False) -> tuple[int, int]:
    """(summed RSS in bytes, number of processes) of ``root`` and its descendants (without
    ``root`` itself with ``exclude_root``)."""
    pids = [p for p in tree(root) if not (exclude_root and p == root)]
    return sum(rss_bytes(p) for p in pids), len(pids)


class PeakRss:
    """``with PeakRss(root) as m: ...``; then ``m.peak`` (bytes) and ``m.peak_processes``.

    With ``root_growth_only`` the root process counts only for what it grew since the start: the
    benchmark's own process is the curate driver, but also holds the reference loops' models,
    which are no part of a curate run. With ``split_root`` the root is kept apart: ``m.peak`` is
    its descendants' (the Ray processes), ``m.root_peak`` its own."""

    def __init__(self, root: int | None = None, interval: float = 0.5, root_growth_only: bool = False,
                 rescan: float = 2.0, split_root: bool = False):
        self.root = root or os.getpid()
        self.interval = interval
        self.rescan = rescan  # listing every process of the machine costs more than reading a few
        self._pids: list[int] = []
        self._scanned = 0.0
        self.root_base = rss_bytes(self.root) if root_growth_only else 0
        self.split_root = split_root
        self.root_peak = 0
        self.peak = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[int, int]:
        now = time.monotonic()
        if now - self._scanned >= self.rescan:
            self._pids, self._scanned = tree(self.root), now
        pids = self._pids
        total = sum(rss_bytes(p) for p in pids if p != self.root)
        root = rss_bytes(self.root)
        self.root_peak = max(self.root_peak, root)
        if not self.split_root:
            total += max(0, root - self.root_base)
        return total, len(pids)

    def _run(self) -> None:
        while not self._stop.is_set():
            total, n = self._sample()
            self.samples += 1
            if total > self.peak:
                self.peak, self.peak_processes = total, n
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        total, n = self._sample()
        if total > self.peak:
            self.peak, self.peak_processes = total, n
