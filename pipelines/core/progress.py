"""Progress lines while a job runs, and the summary table at its end."""

from __future__ import annotations

import sys
import time


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Prints ``rows done, rows/s, ETA`` at most every ``interval`` seconds (and at the end)."""

    def __init__(self, label: str, total_rows: int | None, total_shards: int, enabled: bool = True,
                 interval: float = 2.0, stream=None):
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

    def update(self, rows: int = 0, shards: int = 0, force: bool = False) -> None:
        self.rows += rows
        self.shards += shards
        now = time.monotonic()
        if self.enabled and (force or now - self.last >= self.interval):
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

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
