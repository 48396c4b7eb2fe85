"""The curate sink (images and urls modes): what one shard commits, through ``ShardCommit``.

    scores/S.parquet         every input row with its outcome (``formats/scores.py``, ``sinks/decide.py``)
    curated/S.tar            the kept samples, copied from the input tar member for member
    curated/S.parquet        the kept rows: the input index's own columns, then the scores
    img_emb/, metadata/      with --embeddings, clip-retrieval's layout (``formats/embeddings.py``)

With an img2dataset index, its rows that have no sample (failed downloads, rows skipped by the
metadata rules) are added as error/dropped rows, and resized samples are judged on their original
size (``formats/img2dataset.py``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardsmith.filters.rules import RuleSet
from shardsmith.pipelines.core.commit import ShardCommit
from shardsmith.pipelines.core.ledger import shard_stats
from shardsmith.pipelines.formats.embeddings import embeddings_file, metadata_file
from shardsmith.pipelines.formats.img2dataset import (
    merge_index_rows,
    original_sizes_from_index,
    read_index_parquet,
    sha256_from_index,
)
from shardsmith.pipelines.formats.inputs import InputShard
from shardsmith.pipelines.formats.scores import scores_schema
from shardsmith.pipelines.formats.tar import TarWriter, iter_tar_samples
from shardsmith.pipelines.sinks.decide import decide


def copy_samples(url: str, rows: set[int] | None, tar: TarWriter, keys: set[str] | None = None) -> int:
    """Copy the samples at ``rows`` (tar positions) of the tar at ``url`` into ``tar``, members
    untouched; or, with ``keys``, its readable samples with those keys (a key is unique among them:
    a repeated one is a ``duplicate_key`` error sample), reading no further than the last."""
    n = 0
    if keys is not None and not keys:
        return 0
    for sample in iter_tar_samples(url):
        if sample.row in rows if keys is None else (sample.error_kind is None and sample.key in keys):
            tar.copy_sample(sample)
            n += 1
            if keys is not None and n == len(keys):
                break
    return n


def curated_index(scores: pa.Table, index: pa.Table | None, score_names: list[str]) -> pa.Table:
    """The kept rows' parquet, in shard order: the input's own index columns (img2dataset's
    ``key, url, caption, status, ...``) when it has an index, then the scores."""
    kept = scores.filter(pc.equal(scores.column("status"), "kept"))
    if index is None or "key" not in index.column_names:
        return kept.select(["key", "url", "caption", "original_width", "original_height", *score_names])
    position: dict[str, int] = {}
    for i, k in enumerate(pc.cast(index.column("key"), pa.string()).to_pylist()):
        position.setdefault(k, i)
    take = pa.array([position.get(k) for k in kept.column("key").to_pylist()], pa.int64())
    own = index.drop_columns([c for c in score_names if c in index.column_names]).take(take)
    own = own.set_column(own.column_names.index("key"), "key", kept.column("key"))
    for c in score_names:
        own = own.append_column(c, kept.column(c))
    return own


def write_image_shard(shard: InputShard, results: pa.Table, rules: RuleSet, out_root: str, score_names: list[str],
                      embeddings: np.ndarray | None = None, extra: dict | None = None) -> dict:
    """Decide, write and commit one image shard; returns its ledger entry."""
    commit = ShardCommit(out_root, shard.name)
    index = read_index_parquet(shard.index_url) if shard.index_url else None
    results = sha256_from_index(original_sizes_from_index(results, index), index)
    sampled = decide(results, rules, scores_schema(score_names))  # tar rows
    scores = merge_index_rows(sampled, index)
    stats = shard_stats(scores.column("status").to_pylist(), scores.column("reason").to_pylist())
    kept_rows = {r for r, s in zip(sampled.column("row").to_pylist(), sampled.column("status").to_pylist())
                 if s == "kept"}
    commit.parquet(f"scores/{shard.name}.parquet", scores)
    with commit.open(f"curated/{shard.name}.tar") as f, TarWriter(f) as tar:
        n = copy_samples(shard.url, kept_rows, tar)
    assert n == stats["kept"], (n, stats)
    commit.parquet(f"curated/{shard.name}.parquet", curated_index(scores, index, score_names))
    if embeddings is not None:
        ok = np.array([s != "error" for s in sampled.column("status").to_pylist()], dtype=bool)
        with commit.open(embeddings_file(shard.name)) as f:
            np.save(f, embeddings[ok].astype(np.float16))
        commit.parquet(metadata_file(shard.name),
                       sampled.filter(pa.array(ok)).select(["key", "url", "caption", "status", *score_names]))
    return commit.commit(stats, input=shard.url, **(extra or {}))
