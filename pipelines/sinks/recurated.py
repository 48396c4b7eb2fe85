"""The recurate sink: one shard of a finished run decided again, through ``ShardCommit``.

    RUN/scores/S.parquet (+ RUN's img_emb/metadata of S, when heads are added)
        -> new head columns from the stored fp16 embeddings (``filters/stored.py``)
        -> the rules again (``sinks/decide.py``, as curate decides)
        -> OUTPUT/scores/S.parquet, curated/S.tar (RUN's input members copied untouched),
           curated/S.parquet, then the ledger entry

What the rules did not decide in RUN stays as it was: error rows from reading and decoding (and an
img2dataset index's failed rows) keep their kind and message, and an index's ``skipped`` rows (the
download step's metadata rules) stay dropped. Rows that RUN's rules made errors (``missing_value``,
``bad_value``) are decided again. No image is decoded and no CLIP model is loaded.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardsmith.errors import InputError
from shardsmith.filters.rules import RuleSet
from shardsmith.filters.scores import HeadSpec
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.core.commit import ShardCommit
from shardsmith.pipelines.core.ledger import shard_stats
from shardsmith.pipelines.formats.embeddings import read_embeddings
from shardsmith.pipelines.formats.img2dataset import read_index_parquet
from shardsmith.pipelines.formats.inputs import InputShard
from shardsmith.pipelines.formats.scores import scores_schema
from shardsmith.pipelines.formats.tar import TarWriter
from shardsmith.pipelines.sinks.curated import copy_samples, curated_index
from shardsmith.pipelines.sinks.decide import decide

RULE_ERRORS = ("missing_value", "bad_value")  # error kinds the rules give (filters/rules.py)


def read_run_scores(run: str, shard: str) -> pa.Table:
    url = fsutil.join(run, "scores", f"{shard}.parquet")
    try:
        with fsutil.open_file(url) as f:
            return pq.read_table(f, use_threads=False)
    except FileNotFoundError as e:
        raise InputError(f"{url}: RUN's scores of shard {shard} are missing") from e


def skipped_rows(prev: pa.Table, index: pa.Table | None, score_names: list[str]) -> np.ndarray:
    """Rows an img2dataset index says were ``skipped`` (never fetched), which merge_index_rows adds as
    dropped: no score, nothing for the rules to read again."""
    n = prev.num_rows
    if index is None or "status" not in index.column_names or "key" not in index.column_names:
        return np.zeros(n, bool)
    skipped = set(pc.filter(index.column("key"), pc.equal(index.column("status"), "skipped")).to_pylist())
    unscored = np.ones(n, bool)
    for c in score_names:
        unscored &= prev.column(c).is_null().to_numpy(zero_copy_only=False)
    is_dropped = pc.equal(prev.column("status"), "dropped").to_numpy(zero_copy_only=False)
    keys = prev.column("key").to_pylist()
    return np.array([k in skipped for k in keys], bool) & unscored & is_dropped


def head_columns(meta: pa.Table, emb: np.ndarray, keys: list, heads: dict[str, HeadSpec],
                 embed_dim: int) -> dict[str, pa.Array]:
    """One float32 column per head, aligned with ``keys`` (null where RUN stored no embedding: rows
    that were errors)."""
    from shardsmith.filters.stored import load_stored_head, score_stored

    position = {k: i for i, k in enumerate(meta.column("key").to_pylist())}
    take = np.array([position.get(k, -1) for k in keys], np.int64)
    have = take >= 0
    out = {}
    for name, spec in heads.items():
        values = np.full(len(keys), np.nan, np.float32)
        values[have] = score_stored(load_stored_head(name, spec, embed_dim), emb[take[have]])
        out[name] = pc.if_else(pc.is_nan(pa.array(values)), pa.scalar(None, pa.float32()), pa.array(values))
    return out


def recurate_shard(shard: InputShard, run: str, out_root: str, rules: RuleSet, score_names: list[str],
                   heads: dict[str, HeadSpec], embeddings_from: str | None, embed_dim: int) -> dict:
    """Decide one shard of RUN again into OUTPUT and commit it; returns its ledger entry."""
    commit = ShardCommit(out_root, shard.name)
    prev = read_run_scores(run, shard.name)
    index = read_index_parquet(shard.index_url) if shard.index_url else None
    schema = scores_schema(score_names)
    keys = prev.column("key").to_pylist()
    cols = {}
    if heads:
        meta, emb = read_embeddings(embeddings_from, shard.name)
        cols = head_columns(meta, emb, keys, heads, embed_dim)
    table = pa.table({name: cols[name] if name in cols else prev.column(name) if name in prev.column_names
                      else pa.nulls(prev.num_rows, schema.field(name).type)
                      for name in schema.names if name not in ("status", "reason", "error")})
    fixed = skipped_rows(prev, index, [c for c in score_names if c in prev.column_names])
    # What to decide again: rows the rules decided in RUN. The others keep their kind and message.
    status, reason = prev.column("status").to_pylist(), prev.column("reason").to_pylist()
    kinds = [r if s == "error" and r not in RULE_ERRORS else None for s, r in zip(status, reason)]
    table = table.append_column("error_kind", pa.array(kinds, pa.string()))
    table = table.append_column("error", pc.if_else(pa.array([k is not None for k in kinds]), prev.column("error"),
                                                    pa.scalar(None, pa.string())))
    decided = decide(table.filter(pa.array(~fixed)), rules, schema)
    kept_as_is = prev.filter(pa.array(fixed))
    kept_as_is = pa.table({n: kept_as_is.column(n) if n in kept_as_is.column_names and n not in cols
                           else pa.nulls(kept_as_is.num_rows, schema.field(n).type) for n in schema.names},
                          schema=schema)
    scores = pa.concat_tables([decided, kept_as_is]).sort_by("row")
    stats = shard_stats(scores.column("status").to_pylist(), scores.column("reason").to_pylist())
    kept_keys = set(pc.filter(scores.column("key"), pc.equal(scores.column("status"), "kept")).to_pylist())
    commit.parquet(f"scores/{shard.name}.parquet", scores)
    if kept_keys and not fsutil.exists(shard.url):
        raise InputError(f"{shard.url}: RUN's input shard {shard.name} is no longer readable (not found); "
                         "recurate copies the kept samples from RUN's inputs")
    with commit.open(f"curated/{shard.name}.tar") as f, TarWriter(f) as tar:
        n = copy_samples(shard.url, None, tar, keys=kept_keys)
    if n != stats["kept"]:
        raise InputError(f"{shard.url}: RUN's input shard {shard.name} has changed since RUN: {n} of the "
                         f"{stats['kept']} kept samples were found in it")
    commit.parquet(f"curated/{shard.name}.parquet", curated_index(scores, index, score_names))
    return commit.commit(stats, input=shard.url, parent_shard=fsutil.join(run, "scores", f"{shard.name}.parquet"))
