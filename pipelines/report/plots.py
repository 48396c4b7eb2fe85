"""The report's plots, drawn with matplotlib's object API on the Agg canvas and returned as PNG
bytes: no pyplot, so no global figure state and no display is ever needed (the report runs at the
end of a curate job on a headless driver)."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shardsmith.filters.rules import Rule

COLORS = {"rows": "#4c6a92", "kept": "#2e9e4f", "dropped": "#e07b39", "error": "#8c8c8c", "threshold": "#c0392b"}
STATUS_NAMES = ("kept", "dropped", "error")
DPI = 100
# Fields with long right tails (sizes, ratios, lengths): the x axis stops at this percentile and
# larger values are counted in the last bin, so one 10000 px image does not squash the plot.
TAILED = {"original_width", "original_height", "min_side", "max_side", "aspect_ratio", "caption_length"}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def funnel(stats: dict) -> bytes:
    """Rows read, then kept, then one bar per drop reason and per error kind."""
    bars = [("rows read", stats["rows_read"], COLORS["rows"]), ("kept", stats["kept"], COLORS["kept"])]
    bars += [(f"dropped: {r}", n, COLORS["dropped"]) for r, n in stats.get("dropped_by_reason", {}).items()]
    bars += [(f"error: {k}", n, COLORS["error"]) for k, n in stats.get("errors_by_kind", {}).items()]
    total = max(stats["rows_read"], 1)
    fig = _figure(9, 0.9 + 0.42 * len(bars))
    ax = fig.add_subplot()
    labels = [b[0] for b in bars][::-1]
    counts = [b[1] for b in bars][::-1]
    ax.barh(range(len(bars)), counts, color=[b[2] for b in bars][::-1], height=0.65)
    ax.set_yticks(range(len(bars)), labels)
    ax.set_xlim(0, total * 1.22)
    for y, n in enumerate(counts):
        ax.text(n + total * 0.01, y, f"{n}  ({100 * n / total:.1f}%)", va="center", fontsize=9)
    ax.set_xlabel("rows")
    ax.set_title("What happened to the rows", loc="left", fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _range(field: str, finite: np.ndarray, rules: list[Rule], probability: bool = False) -> tuple[float, float]:
    lo, hi = float(finite.min()), float(finite.max())
    if probability:
        lo, hi = 0.0, 1.0
    elif field in TAILED and len(finite) > 20:
        hi = float(np.percentile(finite, 99.5))
    for r in rules:  # the threshold is always on the plot
        lo, hi = min(lo, r.value), max(hi, r.value)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _bins(lo: float, hi: float, rules: list[Rule], n: int = 50) -> np.ndarray:
    """``n`` equal bins over [lo, hi], shifted so that the first rule's threshold is a bin edge: no
    bar then mixes rows from both sides of the cut."""
    width = (hi - lo) / n
    if not rules or width <= 0:
        return np.linspace(lo, hi, n + 1)
    t = rules[0].value
    first, last = np.floor((lo - t) / width), np.ceil((hi - t) / width)
    return t + width * np.arange(first, last + 1)


def histogram(field: str, label: str, values: np.ndarray, status: np.ndarray, rules: list[Rule],
              probability: bool = False) -> bytes:
    """One score's distribution, stacked by outcome, with each rule's threshold drawn on it and the
    failing side shaded; a probability is plotted on [0, 1]."""
    ok = np.isfinite(values)
    finite = values[ok]
    lo, hi = _range(field, finite, rules, probability)
    bins = _bins(lo, hi, rules)
    clipped = np.clip(values, lo, hi)
    stacks, names, colors = [], [], []
    for code, name in enumerate(STATUS_NAMES):
        sel = ok & (status == code)
        if sel.any():
            stacks.append(clipped[sel])
            names.append(f"{name} ({int(sel.sum())})")
            colors.append(COLORS[name])
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot()
    if stacks:
        ax.hist(stacks, bins=bins, stacked=True, color=colors, label=names, edgecolor="white", linewidth=0.3)
    for r in rules:
        ax.axvline(r.value, color=COLORS["threshold"], linestyle="--", linewidth=1.6, label=f"rule {r.name}")
        if r.op in (">=", ">"):
            ax.axvspan(lo, r.value, color=COLORS["threshold"], alpha=0.07)
        else:
            ax.axvspan(r.value, hi, color=COLORS["threshold"], alpha=0.07)
    ax.set_xlim(lo, hi)
    missing = int((~ok).sum())
    xlabel = label + (f"   ({missing} rows without a value)" if missing else "")
    if field in TAILED and finite.size and float(finite.max()) > hi:
        xlabel += f"   (values above {hi:g} in the last bin)"
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("rows")
    ax.set_title(label, loc="left", fontsize=11)
    fig.legend(loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def scatter(x: np.ndarray, y: np.ndarray, status: np.ndarray, xlabel: str, ylabel: str,
            x_rules: list[Rule], y_rules: list[Rule], shown_of: int) -> bytes:
    """Two scores against each other, one colour per outcome, thresholds as lines."""
    fig = _figure(5.6, 4.4)
    ax = fig.add_subplot()
    ok = np.isfinite(x) & np.isfinite(y)
    size = 14 if ok.sum() < 2000 else 4
    for code, name in enumerate(STATUS_NAMES):
        sel = ok & (status == code)
        if sel.any():
            ax.scatter(x[sel], y[sel], s=size, alpha=0.7, color=COLORS[name], label=f"{name} ({int(sel.sum())})",
                       linewidths=0)
    for r in x_rules:
        ax.axvline(r.value, color=COLORS["threshold"], linestyle="--", linewidth=1.4, label=f"rule {r.name}")
    for r in y_rules:
        ax.axhline(r.value, color=COLORS["threshold"], linestyle=":", linewidth=1.4, label=f"rule {r.name}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    title = f"{xlabel} vs {ylabel}"
    if shown_of > int(ok.sum()):
        title += f"  (a random {int(ok.sum())} of {shown_of} rows)"
    ax.set_title(title, loc="left", fontsize=11)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False, markerscale=8 / np.sqrt(size))
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)
