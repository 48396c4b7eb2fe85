"""The columns that travel between the Ray stages of curate, declared once.

    read   -> SAMPLE:   shard, row, key, image, caption, url, error_kind, error, shard_rows, and
                        read_node (the Ray node that read the rows)
    decode -> DECODED:  SAMPLE without image, with pixels, original_width, original_height, generated,
                        sha256, phash (the dedup fingerprints), and pixels_NAME (uint8) for each input
                        of a model that reads pixels of its own (ScorerSpec.pixel_inputs(): only in
                        runs that have one)
    score  -> SCORED:   DECODED without the pixel columns, with one float32 column per score of the run (NaN:
                        not computed), node_id, scorer, and embedding (with --embeddings)
    driver -> results:  RESULT columns of a complete shard, sorted by row, handed to the writer

Every shard's rows are followed by one sentinel row (``row == SENTINEL``) whose ``shard_rows``
holds the shard's sample count, so the driver knows when a shard is complete however Ray
interleaves the rows. Only small rows reach the driver: image bytes stay in the read tasks, only
model-size pixels travel to the scoring actors, and the writer copies kept samples from the tar.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardsmith.pipelines.core.dispatch import SENTINEL

SAMPLE = {"shard": object, "row": np.int64, "key": object, "image": object, "caption": object, "url": object,
          "error_kind": object, "error": object, "shard_rows": np.int64}
DECODED = {**{k: v for k, v in SAMPLE.items() if k != "image"}, "pixels": np.uint8, "original_width": np.int64,
           "original_height": np.int64, "generated": np.int8, "sha256": object, "phash": np.int64}
TEXT_COLUMNS = ("key", "caption", "url", "error_kind", "error", "sha256")


def is_pixel_column(name: str) -> bool:
    """``pixels`` and the extra pixel inputs ``pixels_NAME``: consumed by the score stage."""
    return name == "pixels" or name.startswith("pixels_")


__all__ = ["SENTINEL", "SAMPLE", "DECODED", "TEXT_COLUMNS", "text", "text_columns", "sample_batch",
           "result_columns", "results_table", "is_pixel_column"]


def text(v) -> str | None:
    """A string cell of a Ray batch, or None. Ray turns an object column holding only None into a
    null-typed Arrow column, which the next stage sees as float NaN: never test ``is None``."""
    return v if isinstance(v, str) else None


def text_columns(batch: dict) -> dict:
    """The batch with its text columns as object arrays of str/None: a column that reached a stage
    as float NaN (all None upstream) must not leave it as floats, or the driver cannot merge it."""
    for c in TEXT_COLUMNS:
        if c in batch:
            batch[c] = np.array([text(v) for v in batch[c]], dtype=object)
    return batch


def sample_batch(rows: list[tuple]) -> dict:
    """Rows of SAMPLE values, in SAMPLE's column order -> a batch. ``shard_rows`` is the shard's
    sample count on its sentinel row, -1 elsewhere; ``read_node`` is filled in here."""
    from shardsmith.pipelines.core.resources import node_id

    cols = list(zip(*rows))
    batch = {name: np.array(cols[i], dtype=dtype) for i, (name, dtype) in enumerate(SAMPLE.items())}
    batch["read_node"] = np.array([node_id()] * len(rows), dtype=object)
    return batch


def result_columns(scores: list[str]) -> list[str]:
    """What the writer gets of each row of a shard."""
    return ["row", "key", "caption", "url", "error_kind", "error", *scores, "original_width", "original_height",
            "generated", "sha256", "phash"]


def _empty(scores: list[str]) -> pa.Table:
    return pa.table({"row": pa.array([], pa.int64()),
                     **{c: pa.array([], pa.string()) for c in TEXT_COLUMNS + ("node_id",)},
                     **{c: pa.array([], pa.float32()) for c in scores},
                     **{c: pa.array([], pa.int64()) for c in ("original_width", "original_height", "phash")},
                     "generated": pa.array([], pa.int8())})


# column -> ledger key: node_ids are the nodes that read or scored the shard's rows
PROVENANCE = {"read_node": "node_ids", "node_id": "node_ids", "scorer": "scored_by", "precision": "precision"}


def results_table(t: pa.Table | None, scores: list[str], embed_dim: int
                  ) -> tuple[pa.Table, np.ndarray | None, dict[str, list[str]]]:
    """A complete shard's scored rows (sentinel removed, in row order) -> (results table with
    nulls where there is no size or score, embeddings, provenance: the distinct node ids, scoring
    actor ids and precisions that made the shard, for its ledger entry)."""
    t = _empty(scores) if t is None else t  # an empty shard
    emb = None
    if "embedding" in t.column_names:
        emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    elif t.num_rows == 0:
        emb = np.zeros((0, embed_dim), np.float16)
    provenance: dict[str, list[str]] = {}
    for col, key in PROVENANCE.items():
        values = {v for v in t.column(col).to_pylist() if text(v)} if col in t.column_names else set()
        provenance[key] = sorted(set(provenance.get(key, [])) | values)
    res = t.select([c for c in result_columns(scores) if c in t.column_names])

    def put(name, col):
        nonlocal res
        res = res.set_column(res.column_names.index(name), name, col)

    for c in TEXT_COLUMNS:
        put(c, pa.array([text(v) for v in res.column(c).to_pylist()], pa.string()))
    # -1 means "no size" (the image was not decoded), NaN "no score": both are nulls on disk; an
    # image not decoded has no pHash either
    if "phash" in res.column_names:
        put("phash", pc.if_else(pc.less(res.column("original_width"), 0), pa.scalar(None, pa.int64()),
                                res.column("phash")))
    for c in ("original_width", "original_height"):
        col = res.column(c)
        put(c, pc.if_else(pc.less(col, 0), pa.scalar(None, col.type), col))
    for c in scores:
        col = res.column(c)
        put(c, pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col))
    g = res.column("generated")
    put("generated", pc.if_else(pc.less(g, 0), pa.scalar(None, pa.bool_()), pc.cast(g, pa.bool_())))
    return res, emb, provenance
