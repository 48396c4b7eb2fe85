"""LAION metadata parquet: the columns under any of their spellings, read in batches.

LAION's releases spell their columns differently (``URL, TEXT, WIDTH, HEIGHT, similarity, punsafe,
pwatermark, AESTHETIC_SCORE`` in any letter case; older ones ``SAMPLE_ID, LICENSE, NSFW``).
``metadata_column_map`` maps a file's own names to shardsmith's: the base columns below, and each
score's spellings from its registry entry (``filters/scores.py``).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardsmith.filters.scores import BUILTIN
from shardsmith.pipelines.core import fs as fsutil

# LAION metadata: canonical column -> accepted spellings (compared case-insensitively).
LAION_COLUMNS = {
    "url": ("url",),
    "caption": ("text", "caption"),
    "original_width": ("width", "original_width"),
    "original_height": ("height", "original_height"),
    **{s.name: s.laion for s in BUILTIN.values() if s.laion},
    "key": ("sample_id", "key"),
    "license": ("license",),
    "nsfw": ("nsfw",),
    "hash": ("hash",),
}


def metadata_column_map(names: list[str]) -> dict[str, str]:
    """canonical name -> the file's own column name, for the LAION columns the file has."""
    lower = {}
    for n in names:
        lower.setdefault(n.lower(), n)
    out = {}
    for canon, spellings in LAION_COLUMNS.items():
        for s in spellings:
            if s in lower:
                out[canon] = lower[s]
                break
    return out


def metadata_schema(url: str) -> pa.Schema:
    with fsutil.open_file(url, "rb") as f:
        return pq.ParquetFile(f).schema_arrow


def iter_metadata_batches(url: str, batch_rows: int = 65536) -> Iterator[pa.RecordBatch]:
    with fsutil.open_file(url, "rb") as f:
        pf = pq.ParquetFile(f)
        yield from pf.iter_batches(batch_size=batch_rows)


def _cast_or_null(col: pa.Array, typ: pa.DataType) -> pa.Array:
    """Cast a column to the scores schema type; a column that cannot be read as such is null
    (a rule that needs it then reports each row as an error; planning already rejected rule
    columns of the wrong type)."""
    try:
        return pc.cast(col, typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        try:
            return pc.cast(col, typ, safe=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return pa.nulls(len(col), typ)


def canonical_batch(batch: pa.RecordBatch, cmap: dict[str, str], first_row: int, schema: pa.Schema) -> pa.Table:
    """The LAION columns under shardsmith's names with the types of ``schema`` (the scores
    parquet's), whatever their letter case; the schema's other columns are null."""
    n = batch.num_rows
    cols = {}
    for name, typ in zip(schema.names, schema.types):
        if name in cmap:
            cols[name] = _cast_or_null(batch.column(cmap[name]), typ)
        else:
            cols[name] = pa.nulls(n, typ)
    rows = pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
    cols["row"] = rows
    if "key" not in cmap:
        cols["key"] = pc.cast(rows, pa.string())
    return pa.table(cols)
