"""What the report shows, read from a finished run: stats, manifest, score distributions and the
rows chosen for the sample grids.

The scores are read one shard at a time and only the numeric columns are kept for the whole run;
each sample grid's candidates are chosen per shard first (the global top 16 is among the union of
every shard's top 16), so memory grows with the number of rows times a few floats, not with the
captions and URLs of the whole run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardsmith.errors import ShardsmithError
from shardsmith.filters.rules import Rule, RuleError, field_values
from shardsmith.filters.scores import BUILTIN, ScoreSet
from shardsmith.pipelines.core import fs as fsutil

STATUS_CODES = {"kept": 0, "dropped": 1, "error": 2}
NUMERIC_OPS = (">=", ">", "<=", "<")
FIELD_LABELS = {  # the fields that are not scores (the scores' labels are in their registry entries)
    "min_side": "min side (px)",
    "max_side": "max side (px)",
    "aspect_ratio": "aspect ratio (long / short side)",
    "caption_length": "caption length (characters)",
    "original_width": "original width (px)",
    "original_height": "original height (px)",
}
SCORE_LABELS = {**{s.name: s.label for s in BUILTIN.values()}, **FIELD_LABELS}
STRING_COLUMNS = ("key", "status", "reason", "error", "caption", "url")


def row_columns(scores: list[str]) -> list[str]:
    """The columns of a scores parquet row the report reads."""
    return ["key", "row", "status", "reason", "error", *scores, "original_width", "original_height", "caption", "url"]


class ReportError(ShardsmithError, RuntimeError):
    """The folder is not a finished shardsmith run (or cannot be read); the message says why."""


@dataclass
class Run:
    output: str
    stats: dict
    manifest: dict

    @property
    def tool(self) -> str:
        return str(self.manifest.get("tool") or self.stats.get("tool") or "shardsmith curate")

    @property
    def is_curate(self) -> bool:
        return self.tool in ("shardsmith curate", "shardsmith recurate")

    @property
    def scores(self) -> ScoreSet:
        """The run's score columns, as its manifest records them (runs before the registry: the built-ins)."""
        return ScoreSet.from_manifest(self.manifest)

    def label(self, field: str) -> str:
        return self.scores.label(field) if field in self.scores else FIELD_LABELS.get(field, field)

    @property
    def mode(self) -> str:
        return str(self.stats.get("mode") or self.manifest.get("fingerprint", {}).get("mode") or "images")


def _read_json(url: str) -> dict:
    try:
        data = json.loads(fsutil.read_text(url))
    except FileNotFoundError as e:
        raise ReportError(f"{url} not found: is this the OUTPUT of a finished shardsmith run?") from e
    except ValueError as e:
        raise ReportError(f"{url} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ReportError(f"{url}: expected a JSON object")
    return data


def load_run(output: str) -> Run:
    if not fsutil.exists(output):
        raise ReportError(f"{output}: no such folder")
    return Run(output, _read_json(fsutil.join(output, "stats.json")),
               _read_json(fsutil.join(output, "manifest.json")))


def comparison_rules(names: list[str]) -> list[Rule]:
    """The run's ``FIELD OP NUMBER`` rules with an order (the ones a threshold can be drawn for)."""
    out = []
    for name in names:
        try:
            rule = Rule.parse(name)
        except RuleError:
            continue
        if rule.op in NUMERIC_OPS:
            out.append(rule)
    return out


def rule_passes(rule: Rule, values: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return {">=": values >= rule.value, ">": values > rule.value,
                "<=": values <= rule.value, "<": values < rule.value}[rule.op]


# ---------------------------------------------------------------------------------------------
# Choosing the rows of the sample grids
# ---------------------------------------------------------------------------------------------

@dataclass
class Grid:
    """A sample grid: a title, what it shows, and how to pick its rows from a table."""

    name: str
    title: str
    note: str
    pick: object  # (table, values: dict[field, np.ndarray], n) -> list of row positions, in display order
    field: str | None = None  # the field the grid is about (shown on each tile)
    rule: Rule | None = None  # for a borderline grid: the rule whose threshold it straddles


def _finite(values: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isfinite(values))


def pick_top(field_name: str, largest: bool):
    def pick(table: pa.Table, values: dict, n: int) -> list[int]:
        v = values[field_name]
        idx = _finite(v)
        order = np.argsort(-v[idx] if largest else v[idx], kind="stable")
        return idx[order[:n]].tolist()
    return pick


def pick_borderline(rule: Rule):
    """The rows closest to the threshold, half on each side, in increasing value."""
    def pick(table: pa.Table, values: dict, n: int) -> list[int]:
        v = values[rule.field]
        idx = _finite(v)
        passes = rule_passes(rule, v[idx])
        dist = np.abs(v[idx] - rule.value)
        chosen = []
        for side, k in ((~passes, n // 2), (passes, n - n // 2)):
            sub = idx[side]
            chosen.extend(sub[np.argsort(dist[side], kind="stable")[:k]].tolist())
        sign = 1 if rule.op in (">=", ">") else -1  # failing side first, then across the threshold
        return sorted(chosen, key=lambda i: (sign * v[i], i))
    return pick


def pick_errors(table: pa.Table, values: dict, n: int) -> list[int]:
    """Error rows, taking each kind in turn so that every kind is seen."""
    status = table.column("status").to_pylist()
    reason = table.column("reason").to_pylist()
    by_kind: dict[str, list[int]] = {}
    for i, (s, r) in enumerate(zip(status, reason)):
        if s == "error":
            by_kind.setdefault(str(r), []).append(i)
    chosen: list[int] = []
    queues = [list(v) for _, v in sorted(by_kind.items())]
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return chosen


def sample_grids(rules: list[Rule], present: set[str]) -> list[Grid]:
    grids = []
    if "aesthetic" in present:
        grids.append(Grid("top_aesthetic", "Highest aesthetic score", "the best rows by the aesthetic score",
                          pick_top("aesthetic", True), "aesthetic"))
        grids.append(Grid("bottom_aesthetic", "Lowest aesthetic score", "the worst rows by the aesthetic score",
                          pick_top("aesthetic", False), "aesthetic"))
    if "pwatermark" in present:
        grids.append(Grid("top_watermark", "Most likely watermarked", "highest watermark probability",
                          pick_top("pwatermark", True), "pwatermark"))
    for rule in rules:
        if rule.field in present:
            grids.append(Grid("borderline-" + re.sub(r"[^A-Za-z0-9]+", "_", rule.name), f"Borderline around {rule.name}",
                              f"the rows closest to the threshold {rule.value:g}, failing side first "
                              f"(sorted by {rule.field})", pick_borderline(rule), rule.field, rule))
    grids.append(Grid("errors", "Errors", "rows that could not be scored, each error kind in turn", pick_errors))
    return grids


# ---------------------------------------------------------------------------------------------
# Scanning the scores
# ---------------------------------------------------------------------------------------------

@dataclass
class Scan:
    """The whole run's numeric columns (for plots) and each grid's chosen rows (for tiles)."""

    fields: list[str]
    values: dict[str, np.ndarray]  # field -> float64 values of every row (NaN = missing)
    status: np.ndarray  # int8 codes of STATUS_CODES, same order
    grids: list[Grid]
    chosen: dict[str, list[dict]] = field(default_factory=dict)  # grid name -> rows (dicts with 'shard')
    rows: int = 0


def scores_files(output: str) -> list[tuple[str, str]]:
    """(shard name, url) of the run's scores parquet files, in shard order."""
    d = fsutil.join(output, "scores")
    if not fsutil.exists(d):
        return []
    return [(url.rstrip("/").rsplit("/", 1)[-1][: -len(".parquet")], url)
            for url in fsutil.list_files(d, (".parquet",))]


def _read_scores(url: str, columns: list[str]) -> pa.Table:
    with fsutil.open_file(url, "rb") as f:
        # use_threads=False: pyarrow 26 reading a Python file object with its thread pool makes
        # ~1 in 10 processes abort at exit ("terminate called without an active exception")
        t = pq.read_table(f, use_threads=False)
    for name in columns:  # older or partial files: the missing columns are null
        if name not in t.column_names:
            t = t.append_column(name, pa.nulls(t.num_rows, pa.string() if name in STRING_COLUMNS else pa.float64()))
    return t


def _present_fields(run: Run, rules: list[Rule]) -> list[str]:
    names = run.scores.names
    computed = run.stats.get("scores_computed")
    if run.mode == "images" and computed is not None:
        scores = [f for f in names if f in computed]
    else:
        scores = list(names)  # metadata mode: whatever columns the input had; checked below
    extra = [r.field for r in rules if r.field not in names]
    return list(dict.fromkeys(scores + extra))


def scan_scores(run: Run, per_grid: int = 16) -> Scan:
    rules = comparison_rules(run.stats.get("rules", []))
    fields = _present_fields(run, rules)
    parts: dict[str, list[np.ndarray]] = {f: [] for f in fields}
    status_parts: list[np.ndarray] = []
    candidates: list[pa.Table] = []
    grids = sample_grids(rules, set(fields))
    columns = row_columns(run.scores.names)
    for shard, url in scores_files(run.output):
        t = _read_scores(url, columns)
        values = {f: field_values(t, f).astype(np.float64) for f in fields}
        for f in fields:
            parts[f].append(values[f])
        status_parts.append(np.array([STATUS_CODES.get(s, 2) for s in t.column("status").to_pylist()], np.int8))
        picked = sorted({i for g in grids for i in g.pick(t, values, per_grid)})
        if picked:
            sub = t.select(columns).take(pa.array(picked, pa.int64()))
            candidates.append(sub.append_column("shard", pa.array([shard] * len(picked), pa.string())))
    values = {f: np.concatenate(parts[f]) if parts[f] else np.zeros(0) for f in fields}
    # a field with no value at all (a head not computed, a metadata column absent) is not shown
    fields = [f for f in fields if np.isfinite(values[f]).any()]
    grids = sample_grids(rules, set(fields))
    scan = Scan(fields, {f: values[f] for f in fields},
                np.concatenate(status_parts) if status_parts else np.zeros(0, np.int8), grids)
    scan.rows = len(scan.status)
    if candidates:
        cand = pa.concat_tables(candidates, promote_options="permissive")
        cvalues = {f: field_values(cand, f).astype(np.float64) for f in fields}
        for g in grids:
            rows = cand.take(pa.array(g.pick(cand, cvalues, per_grid), pa.int64())).to_pylist()
            scan.chosen[g.name] = rows
    return scan


def subsample(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """At most ``limit`` row positions (a fixed random subset), so a scatter of 100M rows stays readable."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
