"""Small helpers shared by the figures: timing, medians, progress lines, the machine's state.

Every figure is a ratio of two rates measured in the same run, alternating the two sides
(A B A B A ...) so that a change in the machine's load hits both; each curate-side measurement
is compared with the mean of the reference measurements just before and just after it, and the
figure is the median of those ratios.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

_T0 = time.monotonic()


def say(msg: str) -> None:
    """A progress line with the time since the benchmark started (stderr, unbuffered)."""
    t = time.monotonic() - _T0
    print(f"[bench {int(t) // 60:02d}:{int(t) % 60:02d}] {msg}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (user + system)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def paired_ratios(measured: list[float], reference: list[float]) -> list[float]:
    """``measured[i]`` was taken between ``reference[i]`` and ``reference[i + 1]``: its ratio to
    the mean of those two."""
    assert len(reference) == len(measured) + 1, (len(measured), len(reference))
    return [m / ((reference[i] + reference[i + 1]) / 2) for i, m in enumerate(measured)]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def figure(value: float, target: float, higher_is_better: bool = True, **details) -> dict:
    """One figure of results.json: the ratio, its target, pass/fail and how it was measured."""
    ok = value >= target if higher_is_better else value <= target
    return {"value": round(value, 4), "target": target, "target_is": "min" if higher_is_better else "max",
            "pass": bool(ok), **details}


def rnd(xs, nd: int = 3):
    if isinstance(xs, (list, tuple)):
        return [round(x, nd) for x in xs]
    return round(xs, nd)
