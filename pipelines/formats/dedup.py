"""What ``shardsmith dedup`` writes per shard, and the names of its work files.

    OUTPUT/dedup/S.parquet     every input row of shard S (the kept rows of the RUN's curated/S),
                               in that order: DEDUP_SCHEMA
    OUTPUT/curated/S.tar       the survivors, copied from the RUN's curated/S.tar member for member
    OUTPUT/curated/S.parquet   the survivors' rows of the RUN's curated/S.parquet, columns untouched
    OUTPUT/_work/              the stages' intermediate files (removed when the run is complete)

S is the RUN's shard name with one RUN, ``rI_NAME`` (I = the RUN's position) with several. A row is
``kept`` (a survivor: no better-ranked row is within a method's threshold of it) or
``duplicate``: ``matched`` is the best-ranked row it is within the threshold of (``method``,
``distance`` = pHash Hamming bits (0 for exact), ``similarity`` = cosine), ``duplicate_of`` the
survivor reached by following ``matched`` (the same row unless the matched row is itself a
duplicate), ``group`` the survivor's row id: every row of a group has it.
"""

from __future__ import annotations

import pyarrow as pa

DEDUP_DIR = "dedup"
CURATED_DIR = "curated"
WORK_DIR = "_work"
PARTS = (DEDUP_DIR, CURATED_DIR, WORK_DIR)
METHOD_NAMES = ("exact", "phash", "semantic")  # method codes 0, 1, 2 in the work files

DEDUP_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("row", pa.int64()),  # position in the RUN's curated/S.parquet (and tar)
    ("status", pa.string()),  # kept | duplicate
    ("duplicate_of", pa.string()),  # key of the group's survivor (duplicates)
    ("duplicate_of_shard", pa.string()),  # its shard in this OUTPUT
    ("group", pa.int64()),  # the survivor's row id (the same for every row of a group)
    ("method", pa.string()),  # exact | phash | semantic: how the row matched
    ("distance", pa.int32()),  # pHash Hamming distance of the match (exact: 0)
    ("similarity", pa.float32()),  # cosine of the match (semantic)
    ("matched", pa.string()),  # key of the row it matched directly
    ("matched_shard", pa.string()),
])


def dedup_file(shard: str) -> str:
    return f"{DEDUP_DIR}/{shard}.parquet"


def work_file(*parts: str) -> str:
    return "/".join((WORK_DIR, *parts))
