"""Writers: a shard's scores parquet, curated webdataset tar + parquet, and embeddings.

Every file is written under a temporary name in ``OUTPUT/_tmp`` and moved to its final name when
complete; the shard is committed by its ledger entry, written after all of its files.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardsmith.filters.rules import SCORE_FIELDS, RuleSet
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.formats.img2dataset import merge_index_rows, original_sizes_from_index
from shardsmith.pipelines.core.ledger import Ledger, OutputLayout, shard_stats
from shardsmith.pipelines.formats.tar import iter_tar_samples, read_index_parquet
from shardsmith.pipelines.formats.inputs import InputShard

SCORES_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("row", pa.int64()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("error", pa.string()),
    ("aesthetic", pa.float32()),
    ("pwatermark", pa.float32()),
    ("punsafe", pa.float32()),
    ("similarity", pa.float32()),
    ("original_width", pa.int64()),
    ("original_height", pa.int64()),
    ("caption", pa.string()),
    ("url", pa.string()),
    ("generated", pa.bool_()),  # shardsmith's invisible watermark found (null: not looked for)
])


def write_parquet(url: str, table: pa.Table, tmp_dir: str) -> None:
    with fsutil.atomic_write(url, tmp_dir=tmp_dir) as f:
        pq.write_table(table, f, compression="zstd")


def decide(table: pa.Table, rules: RuleSet) -> pa.Table:
    """Apply the rules to a shard's results and return its scores table (every row, in order).

    ``table`` has the SCORES_SCHEMA columns except status/reason, plus ``error_kind`` set for rows
    that failed before scoring (unreadable image, missing member...)."""
    table = table.sort_by("row")
    # An all-None object column can reach us as nulls or as NaN floats: only strings are errors.
    kinds = [k if isinstance(k, str) else None for k in table.column("error_kind").to_pylist()]
    errors = [e if isinstance(e, str) else None for e in table.column("error").to_pylist()]
    status = ["error" if k else "kept" for k in kinds]
    decision = rules.apply(table, status=status, reason=list(kinds), error=errors)
    cols = {name: table.column(name) if name in table.column_names else pa.nulls(table.num_rows, t)
            for name, t in zip(SCORES_SCHEMA.names, SCORES_SCHEMA.types)}
    cols["status"], cols["reason"], cols["error"] = decision.arrow()
    return pa.table({k: cols[k].cast(SCORES_SCHEMA.field(k).type) for k in SCORES_SCHEMA.names})


def write_curated_tar(shard: InputShard, kept_rows: set[int], url: str, tmp_dir: str) -> int:
    """Copy the kept samples' members from the source tar, bytes and headers untouched."""
    n = 0
    with fsutil.atomic_write(url, tmp_dir=tmp_dir) as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as out:
        for sample in iter_tar_samples(shard.url):
            if sample.row not in kept_rows:
                continue
            for info in sample.infos:
                data = sample.members[_member_ext(info.name)]
                out.addfile(_copy_info(info, len(data)), io.BytesIO(data))
            n += 1
    return n


def _member_ext(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.split(".", 1)[1].lower()


def _copy_info(info: tarfile.TarInfo, size: int) -> tarfile.TarInfo:
    new = tarfile.TarInfo(info.name)
    new.size, new.mtime, new.mode = size, info.mtime, info.mode
    new.uid, new.gid, new.uname, new.gname = info.uid, info.gid, info.uname, info.gname
    return new


def curated_index(scores: pa.Table, index: pa.Table | None) -> pa.Table:
    """The kept rows' parquet, in shard order: the input's own index columns (img2dataset's
    ``key, url, caption, status, ...``) when it has an index, then the scores."""
    kept = scores.filter(pc.equal(scores.column("status"), "kept"))
    if index is None or "key" not in index.column_names:
        return kept.select(["key", "url", "caption", "original_width", "original_height", *SCORE_FIELDS])
    position: dict[str, int] = {}
    for i, k in enumerate(pc.cast(index.column("key"), pa.string()).to_pylist()):
        position.setdefault(k, i)
    take = pa.array([position.get(k) for k in kept.column("key").to_pylist()], pa.int64())
    own = index.drop_columns([c for c in SCORE_FIELDS if c in index.column_names]).take(take)
    own = own.set_column(own.column_names.index("key"), "key", kept.column("key"))
    for c in SCORE_FIELDS:
        own = own.append_column(c, kept.column(c))
    return own


def write_image_shard(shard: InputShard, results: pa.Table, rules: RuleSet, out_root: str,
                      embeddings: np.ndarray | None = None, extra: dict | None = None) -> dict:
    """Decide, write and commit one image shard; returns its ledger entry.

    With an img2dataset index, its rows that have no sample (failed downloads, rows skipped by the
    metadata rules) are added as error/dropped rows, and resized samples are judged on their
    original size (``pipelines.img2dataset``)."""
    layout = OutputLayout(out_root)
    tmp = layout.tmp_dir
    index = read_index_parquet(shard.index_url) if shard.index_url else None
    sampled = decide(original_sizes_from_index(results, index), rules)  # the tar's samples, tar row numbers
    scores = merge_index_rows(sampled, index)
    status = scores.column("status").to_pylist()
    reason = scores.column("reason").to_pylist()
    stats = shard_stats(status, reason)
    kept_rows = {r for r, s in zip(sampled.column("row").to_pylist(), sampled.column("status").to_pylist())
                 if s == "kept"}
    write_parquet(layout.path("scores", f"{shard.name}.parquet"), scores, tmp)
    n = write_curated_tar(shard, kept_rows, layout.path("curated", f"{shard.name}.tar"), tmp)
    assert n == stats["kept"], (n, stats)
    write_parquet(layout.path("curated", f"{shard.name}.parquet"), curated_index(scores, index), tmp)
    outputs = [f"scores/{shard.name}.parquet", f"curated/{shard.name}.tar", f"curated/{shard.name}.parquet"]
    if embeddings is not None:
        ok = np.array([s != "error" for s in sampled.column("status").to_pylist()], dtype=bool)
        with fsutil.atomic_write(layout.path("img_emb", f"img_emb_{shard.name}.npy"), tmp_dir=tmp) as f:
            np.save(f, embeddings[ok].astype(np.float16))
        meta = sampled.filter(pa.array(ok)).select(["key", "url", "caption", "status", *SCORE_FIELDS])
        write_parquet(layout.path("metadata", f"metadata_{shard.name}.parquet"), meta, tmp)
        outputs += [f"img_emb/img_emb_{shard.name}.npy", f"metadata/metadata_{shard.name}.parquet"]
    entry = {**stats, "input": shard.url, "outputs": outputs, **(extra or {})}
    Ledger(layout).commit(shard.name, entry)
    return entry
