"""The scores parquet (``OUTPUT/scores/S.parquet``): every input row of a shard with its outcome.

Columns: ``key, row, status (kept|dropped|error), reason (rule or error kind), error (message)``,
one float32 column per score of the run (the registry's built-ins, then the declared heads; null
where not computed), ``original_width, original_height, caption, url, generated``, and the dedup
fingerprints ``sha256`` (hex, of the image bytes; img2dataset's own column when the shard's index has
one) and ``phash`` (int64: the 64 bits of the pHash, ``filters/fingerprint.py``; null where the image
was not decoded). Metadata mode has no image: both null.
"""

from __future__ import annotations

import pyarrow as pa

from shardsmith.filters.scores import BUILTIN

BEFORE_SCORES = [("key", pa.string()), ("row", pa.int64()), ("status", pa.string()), ("reason", pa.string()),
                 ("error", pa.string())]
AFTER_SCORES = [("original_width", pa.int64()), ("original_height", pa.int64()), ("caption", pa.string()),
                ("url", pa.string()),
                ("generated", pa.bool_()),  # shardsmith's invisible watermark found (null: not looked for)
                ("sha256", pa.string()), ("phash", pa.int64())]  # dedup fingerprints (shardsmith dedup)


def scores_schema(scores: list[str]) -> pa.Schema:
    return pa.schema(BEFORE_SCORES + [(s, pa.float32()) for s in scores] + AFTER_SCORES)


SCORES_SCHEMA = scores_schema(list(BUILTIN))  # a run without heads of its own (and metadata mode)
