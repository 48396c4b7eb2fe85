"""Progress while a job runs (a live bar on a terminal, plain lines in logs), and the summary table at its end."""

from __future__ import annotations

import os
import sys
import time


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


_LIVE: list["Progress"] = []  # open live bars, closed before an error line is printed


def want_bar(stream) -> bool:
    """A live bar on a terminal, plain lines elsewhere (logs, CI, a pipe); ``SHARDSMITH_PROGRESS=
    bar|plain`` forces one."""
    mode = os.environ.get("SHARDSMITH_PROGRESS", "auto").lower()
    if mode in ("bar", "plain"):
        return mode == "bar"
    try:
        return bool(stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


class Progress:
    """A job's progress: rows done, rows/s, ETA and shards committed. On a terminal a live bar
    (tqdm); elsewhere a plain line at most every ``interval`` seconds (and at the end). ``close()``
    ends it: the bar's last state stays on screen, plain mode prints its final line."""

    def __init__(self, label: str, total_rows: int | None, total_shards: int, enabled: bool = True,
                 interval: float = 2.0, stream=None, bar: bool | None = None):
        self.label = label
        self.total_rows = total_rows
        self.total_shards = total_shards
        self.enabled = enabled
        self.interval = interval
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.last = 0.0
        self.rows = 0
        self.shards = 0
        self.bar = None
        if enabled and (want_bar(self.stream) if bar is None else bar):
            self.bar = self._make_bar()
            _LIVE.append(self)

    def _make_bar(self):
        from tqdm import tqdm

        if self.total_rows:  # a bar of rows, tqdm's own rate and ETA
            fmt = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} rows | {postfix[0]} | {rate_fmt} | ETA {remaining}"
            total, unit = self.total_rows, " rows"
        else:  # rows unknown up front: a bar of shards, rows and rows/s beside it
            fmt = "{desc} {percentage:3.0f}%|{bar}| {postfix[0]} | ETA {remaining}"
            total, unit = self.total_shards, " shards"
        try:  # a terminal that reports no size (0 columns) would get an empty bar: assume 100
            sized = os.get_terminal_size(self.stream.fileno()).columns > 0
        except (AttributeError, OSError, ValueError):
            sized = False
        bar = tqdm(total=total, unit=unit, desc=f"[{self.label}]", file=self.stream, bar_format=fmt,
                   postfix=[self._postfix()],
                   dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20, mininterval=0.25,
                   smoothing=0.1, leave=True)
        return bar

    def _postfix(self) -> str:
        shards = f"{self.shards}/{self.total_shards} shards committed"
        return shards if self.total_rows else f"{self.rows} rows | {shards} | {self.rate():.1f} rows/s"

    def update(self, rows: int = 0, shards: int = 0, force: bool = False) -> None:
        self.rows += rows
        self.shards += shards
        if self.bar is not None:
            self.bar.postfix[0] = self._postfix()
            self.bar.update(rows if self.total_rows else shards)
            if force:
                self.bar.refresh()
            return
        now = time.monotonic()
        if self.enabled and (force or now - self.last >= self.interval):
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def close(self) -> None:
        """The end: the bar's final state (or the last plain line)."""
        if self.bar is None:
            self.update(force=True)
            return
        self.bar.postfix[0] = self._postfix()
        self.bar.close()
        self.bar = None
        if self in _LIVE:
            _LIVE.remove(self)

    def rate(self, now: float | None = None) -> float:
        elapsed = (now or time.monotonic()) - self.start
        return self.rows / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        rate = self.rate(now)
        if self.total_rows:
            pct = f" ({100 * self.rows / self.total_rows:.0f}%)"
            eta = (self.total_rows - self.rows) / rate if rate > 0 else None
            done = f"{self.rows}/{self.total_rows} rows{pct}"
        else:
            frac = self.shards / self.total_shards if self.total_shards else 1.0
            elapsed = (now or time.monotonic()) - self.start
            eta = elapsed * (1 - frac) / frac if frac > 0 else None
            done = f"{self.rows} rows"
        return (f"[{self.label}] {done} | {self.shards}/{self.total_shards} shards committed | "
                f"{rate:.1f} rows/s | ETA {_fmt_eta(eta)}")


def close_live_bars() -> None:
    """End every open bar (before an error or interruption line is printed under it)."""
    for p in list(_LIVE):
        try:
            p.close()
        except Exception:
            _LIVE.remove(p)


def table(headers: list[str], rows: list[list], aligns: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    aligns = aligns or "l" + "r" * (len(headers) - 1)

    def fmt(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, aligns))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])


def summary(stats: dict, title: str, notes: list[str] | None = None, max_shards: int = 20) -> str:
    """A readable end-of-run summary from a stats.json dict."""
    out = [title, ""]
    shards = stats.get("shards", {})
    rows = [[name, s["rows_read"], s["kept"], s["dropped"], s["errors"]] for name, s in list(shards.items())[:max_shards]]
    if len(shards) > max_shards:
        rows.append([f"... {len(shards) - max_shards} more", "", "", "", ""])
    rows.append(["TOTAL", stats["rows_read"], stats["kept"], stats["dropped"], stats["errors"]])
    out.append(table(["shard", "rows", "kept", "dropped", "errors"], rows))
    if stats.get("dropped_by_reason"):
        out += ["", table(["dropped by rule", "rows"], [[k, v] for k, v in stats["dropped_by_reason"].items()])]
    if stats.get("errors_by_kind"):
        out += ["", table(["errors by kind", "rows"], [[k, v] for k, v in stats["errors_by_kind"].items()])]
    for n in notes or []:
        out.append(n)
    return "\n".join(out)
