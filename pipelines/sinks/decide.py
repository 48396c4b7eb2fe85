"""Deciding a shard: the rules applied to its results give each row its status and reason."""

from __future__ import annotations

import pyarrow as pa

from shardsmith.filters.rules import RuleSet
from shardsmith.pipelines.formats.scores import SCORES_SCHEMA


def decide(table: pa.Table, rules: RuleSet, schema: pa.Schema = SCORES_SCHEMA) -> pa.Table:
    """Apply the rules to a shard's results and return its scores table (every row, in order).

    ``table`` has the schema's columns except status/reason, plus ``error_kind`` set for rows
    that failed before scoring (unreadable image, missing member...)."""
    table = table.sort_by("row")
    # An all-None object column can reach us as nulls or as NaN floats: only strings are errors.
    kinds = [k if isinstance(k, str) else None for k in table.column("error_kind").to_pylist()]
    errors = [e if isinstance(e, str) else None for e in table.column("error").to_pylist()]
    status = ["error" if k else "kept" for k in kinds]
    decision = rules.apply(table, status=status, reason=list(kinds), error=errors)
    cols = {name: table.column(name) if name in table.column_names else pa.nulls(table.num_rows, t)
            for name, t in zip(schema.names, schema.types)}
    cols["status"], cols["reason"], cols["error"] = decision.arrow()
    return pa.table({k: cols[k].cast(schema.field(k).type) for k in schema.names})
