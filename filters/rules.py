"""Declarative filter rules, evaluated column-wise on a table of scores.

A rule is a short text, the same in a YAML config, on the command line and in the ``reason``
column of a dropped row:

    aesthetic >= 5          pwatermark < 0.8        punsafe < 0.5        similarity >= 0.28
    min_side >= 512         aspect_ratio <= 3       caption_length >= 5  has url

``FIELD OP NUMBER`` with OP one of ``>= > <= < == !=``, or ``has FIELD`` (present and non-empty).
FIELD is a column of the table (a score of the registry, ``filters.scores``: the built-ins
``aesthetic pwatermark punsafe similarity`` and any head the run declares; the original size
``original_width original_height``) or a derived quantity: ``min_side``, ``max_side``,
``aspect_ratio`` (long side / short side, >= 1) and ``caption_length`` (characters).

A row is kept when it passes every rule. A dropped row's ``reason`` is the first rule it fails,
in the order given. A row whose value for a rule's field is missing (null/NaN) or outside the
field's valid range is an error row, never silently kept or dropped.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardsmith.errors import ConfigError
from shardsmith.filters.scores import BUILTIN

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
       "==": operator.eq, "!=": operator.ne}

# Valid value ranges of the fields that are not scores (the scores' come from their registry
# entries); a value outside is bad data (an error row), and a rule threshold outside is a config
# error raised before any work starts.
BASE_RANGES: dict[str, tuple[float, float]] = {
    "original_width": (0.0, math.inf),
    "original_height": (0.0, math.inf),
    "min_side": (0.0, math.inf),
    "max_side": (0.0, math.inf),
    "aspect_ratio": (1.0, math.inf),
    "caption_length": (0.0, math.inf),
}
# The ranges of the built-in scores and the base fields: what a rule is checked against when the
# run declares no heads of its own (ScoreSet.ranges() adds those).
FIELD_RANGES: dict[str, tuple[float, float]] = {**{s.name: s.range for s in BUILTIN.values()}, **BASE_RANGES}
DERIVED = {"min_side", "max_side", "aspect_ratio", "caption_length"}
SCORE_FIELDS = tuple(BUILTIN)  # the built-in scores, in column order

_CMP = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")
_HAS = re.compile(r"^\s*has\s+([A-Za-z_][A-Za-z0-9_]*)\s*$")


class RuleError(ConfigError):
    """A rule that cannot be parsed or cannot apply; raised before any work is scheduled."""


@dataclass(frozen=True)
class Rule:
    field: str
    op: str  # one of OPS, or "has"
    value: float | None = None
    valid: tuple[float, float] = (-math.inf, math.inf)  # the field's valid range (values outside: error rows)

    @property
    def name(self) -> str:
        if self.op == "has":
            return f"has {self.field}"
        v = self.value
        text = str(int(v)) if v is not None and float(v).is_integer() else repr(v)
        return f"{self.field}{self.op}{text}"

    @classmethod
    def parse(cls, text: str, ranges: dict[str, tuple[float, float]] | None = None) -> "Rule":
        """``ranges``: the valid range of each field (default: the built-in scores and base fields)."""
        if not isinstance(text, str):
            raise RuleError(f"rule {text!r}: expected a text such as 'aesthetic >= 5'")
        m = _HAS.match(text)
        if m:
            return cls(m.group(1), "has")
        m = _CMP.match(text)
        if not m:
            raise RuleError(
                f"rule {text!r}: expected 'FIELD OP NUMBER' (OP one of >= > <= < == !=) or "
                "'has FIELD', e.g. 'aesthetic >= 5'"
            )
        field, op, value = m.group(1), m.group(2), float(m.group(3))
        rng = {**FIELD_RANGES, **(ranges or {})}.get(field)
        if rng and not (rng[0] <= value <= rng[1]):
            raise RuleError(f"rule {text!r}: threshold {value:g} is outside the range of {field} "
                            f"[{rng[0]:g}, {rng[1]:g}]")
        return cls(field, op, value, tuple(rng) if rng else (-math.inf, math.inf))

    def needs(self) -> set[str]:
        """Source columns this rule reads."""
        if self.field in ("min_side", "max_side", "aspect_ratio"):
            return {"original_width", "original_height"}
        if self.field == "caption_length":
            return {"caption"}
        return {self.field}


def field_values(table: pa.Table, field: str) -> np.ndarray:
    """A float array (NaN = missing) for a numeric or derived field of ``table``."""
    if field in ("min_side", "max_side", "aspect_ratio"):
        w = field_values(table, "original_width")
        h = field_values(table, "original_height")
        with np.errstate(divide="ignore", invalid="ignore"):
            if field == "min_side":
                return np.minimum(w, h)
            if field == "max_side":
                return np.maximum(w, h)
            lo, hi = np.minimum(w, h), np.maximum(w, h)
            return np.where(lo > 0, hi / np.where(lo > 0, lo, 1), np.nan)
    if field == "caption_length":
        col = table.column("caption")
        return pc.fill_null(pc.utf8_length(col), 0).to_numpy(zero_copy_only=False).astype(np.float64)
    col = table.column(field)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_null(col.type)):
        raise RuleError(f"column {field!r} has type {col.type}, a rule needs numbers")
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)


STATUSES = ("kept", "dropped", "error")
KEPT, DROPPED, ERROR = 0, 1, 2


class _Table:
    """Strings interned to small integer codes; code 0 is None."""

    def __init__(self):
        self.values: list[str | None] = [None]
        self.codes: dict[str, int] = {}

    def code(self, value) -> int:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return 0
        value = str(value)
        c = self.codes.get(value)
        if c is None:
            c = self.codes[value] = len(self.values)
            self.values.append(value)
        return c

    def codes_of(self, values) -> np.ndarray:
        return np.fromiter((self.code(v) for v in values), dtype=np.int32, count=len(values))


class Decision:
    """Per-row outcomes, held as integer codes so that millions of rows cost no Python strings:
    ``status_code`` (0 kept, 1 dropped, 2 error), ``reason_code`` and ``error_code`` indexing
    their string tables (0 = none). ``status``/``reason``/``error`` give numpy object arrays;
    ``arrow()`` gives Arrow string arrays, built by a vectorised take."""

    def __init__(self, status_code: np.ndarray, reasons: _Table, reason_code: np.ndarray, errors: _Table,
                 error_code: np.ndarray):
        self.status_code, self.reason_code, self.error_code = status_code, reason_code, error_code
        self._reasons, self._errors = reasons, errors

    @property
    def status(self) -> np.ndarray:
        return np.array(STATUSES, dtype=object)[self.status_code]

    @property
    def reason(self) -> np.ndarray:
        return np.array(self._reasons.values, dtype=object)[self.reason_code]

    @property
    def error(self) -> np.ndarray:
        return np.array(self._errors.values, dtype=object)[self.error_code]

    def arrow(self) -> tuple[pa.Array, pa.Array, pa.Array]:
        """(status, reason, error) as Arrow string arrays."""
        def take(values, codes):
            return pc.take(pa.array(values, pa.string()), pa.array(codes, pa.int32()))

        return (take(STATUSES, self.status_code), take(self._reasons.values, self.reason_code),
                take(self._errors.values, self.error_code))


class RuleSet:
    def __init__(self, rules: list[Rule]):
        self.rules = rules

    @classmethod
    def parse(cls, texts: list[str], ranges: dict[str, tuple[float, float]] | None = None) -> "RuleSet":
        return cls([Rule.parse(t, ranges) for t in texts])

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rules]

    def needs(self) -> set[str]:
        out: set[str] = set()
        for r in self.rules:
            out |= r.needs()
        return out

    def apply(self, table: pa.Table, status=None, reason=None, error=None) -> Decision:
        """Decide every row. Rows already marked ``error`` (decode failures...) stay errors; then
        a row with a missing or out-of-range value in any field a rule reads is an error, whatever
        the rule order; then the first rule a row fails drops it. ``status``/``reason``/``error``:
        the outcomes known before the rules (per row; default kept, none, none)."""
        n = table.num_rows
        reasons, errors = _Table(), _Table()
        if status is None:
            status_code = np.zeros(n, dtype=np.int8)
        else:
            status_code = np.fromiter((STATUSES.index(s) for s in status), dtype=np.int8, count=n)
        reason_code = reasons.codes_of(reason) if reason is not None else np.zeros(n, dtype=np.int32)
        error_code = errors.codes_of(error) if error is not None else np.zeros(n, dtype=np.int32)
        open_rows = status_code != ERROR
        values: dict[str, np.ndarray] = {}
        for rule in self.rules:
            if rule.op == "has" or rule.field in values:
                continue
            vals = values[rule.field] = field_values(table, rule.field)
            missing = open_rows & np.isnan(vals)
            if missing.any():
                status_code[missing], reason_code[missing] = ERROR, reasons.code("missing_value")
                error_code[missing] = errors.code(f"{rule.field} is missing (null or NaN); rule '{rule.name}' needs it")
            lo, hi = rule.valid
            with np.errstate(invalid="ignore"):
                bad = open_rows & ~np.isnan(vals) & ((vals < lo) | (vals > hi))
            if bad.any():
                status_code[bad], reason_code[bad] = ERROR, reasons.code("bad_value")
                for i in np.flatnonzero(bad):  # the value in the message: rare (a broken file)
                    error_code[i] = errors.code(f"{rule.field}={vals[i]:g} is outside its valid range [{lo:g}, {hi:g}]")
            open_rows &= ~missing & ~bad
        for rule in self.rules:
            if not open_rows.any():
                break
            if rule.op == "has":
                col = table.column(rule.field) if rule.field in table.column_names else None
                if col is None:
                    ok = np.zeros(n, dtype=bool)
                elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                    ok = pc.fill_null(pc.greater(pc.utf8_length(col), 0), False).to_numpy(zero_copy_only=False)
                else:
                    ok = pc.is_valid(col).to_numpy(zero_copy_only=False)
            else:
                with np.errstate(invalid="ignore"):
                    ok = OPS[rule.op](values[rule.field], rule.value)
            drop = open_rows & ~ok
            if drop.any():
                status_code[drop], reason_code[drop] = DROPPED, reasons.code(rule.name)
            open_rows &= ok
        return Decision(status_code, reasons, reason_code, errors, error_code)
