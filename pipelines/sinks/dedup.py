"""The dedup sink: what one output shard commits, through ``ShardCommit``.

    dedup/S.parquet     every input row with its status (``formats/dedup.py``)
    curated/S.tar       the survivors, copied from the RUN's curated tar, members untouched
    curated/S.parquet   the survivors' rows of the RUN's curated parquet, columns untouched

A duplicate's ``matched`` row is its best-ranked match (``stages/dedup.py``, stage best); when that
row is itself a duplicate, its own match is followed (reading the other shards' best files, only
the rows needed) until a survivor: ``duplicate_of``. Matches always go to a better-ranked row, so
the chain ends. The ledger entry counts rows in = kept + dropped (duplicates, by method).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.core.commit import ShardCommit
from shardsmith.pipelines.formats.dedup import DEDUP_SCHEMA, METHOD_NAMES, dedup_file, work_file
from shardsmith.pipelines.formats.tar import TarWriter
from shardsmith.pipelines.sinks.curated import copy_samples
from shardsmith.pipelines.stages.dedup import DedupShard


def _matches(out_root: str, name: str) -> dict[int, tuple]:
    """gid -> (target gid, target shard index, target key, method, distance, similarity) of a shard's
    duplicates."""
    with fsutil.open_file(fsutil.join(out_root, work_file("best", f"{name}.parquet"))) as f:
        t = pq.read_table(f, columns=["gid", "t_gid", "t_dst", "t_key", "method", "distance", "similarity"])
    return {row[0]: row[1:] for row in zip(*(t.column(c).to_pylist() for c in t.column_names))}


def write_dedup_shard(src: DedupShard, names: list[str], out_root: str) -> dict:
    """Write and commit one output shard; ``names``: every output shard's name, by index."""
    commit = ShardCommit(out_root, src.name)
    with fsutil.open_file(fsutil.join(src.run_url, "curated", f"{src.shard}.parquet")) as f:
        curated = pq.read_table(f)
    keys = curated.column("key").cast(pa.string()).to_pylist()
    own = _matches(out_root, src.name)
    loaded = {src.index: own}

    def match(gid: int, shard: int):
        if shard not in loaded:
            loaded[shard] = _matches(out_root, names[shard])
        return loaded[shard].get(gid)

    cols = {n: [] for n in DEDUP_SCHEMA.names}
    by_method = Counter()
    for i, key in enumerate(keys):
        gid = src.base + i
        m = own.get(gid)
        cols["key"].append(key)
        cols["row"].append(i)
        if m is None:
            for c, v in (("status", "kept"), ("group", gid)):
                cols[c].append(v)
            for c in ("duplicate_of", "duplicate_of_shard", "method", "distance", "similarity", "matched",
                      "matched_shard"):
                cols[c].append(None)
            continue
        target, shard, tkey = m[0], m[1], m[2]
        nxt = match(target, shard)
        while nxt is not None:  # the matched row is a duplicate too: follow to its survivor
            target, shard, tkey = nxt[0], nxt[1], nxt[2]
            nxt = match(target, shard)
        method = METHOD_NAMES[m[3]]
        by_method[method] += 1
        for c, v in (("status", "duplicate"), ("duplicate_of", tkey), ("duplicate_of_shard", names[shard]),
                     ("group", target), ("method", method), ("distance", None if m[4] < 0 else m[4]),
                     ("similarity", None if m[5] != m[5] else m[5]), ("matched", m[2]), ("matched_shard", names[m[1]])):
            cols[c].append(v)
    table = pa.table({n: pa.array(cols[n], DEDUP_SCHEMA.field(n).type) for n in DEDUP_SCHEMA.names},
                     schema=DEDUP_SCHEMA)
    commit.parquet(dedup_file(src.name), table)
    survivors = np.array([s == "kept" for s in cols["status"]], dtype=bool)
    kept_keys = {k for k, s in zip(keys, survivors) if s}
    with commit.open(f"curated/{src.name}.tar") as f, TarWriter(f) as tar:
        n = copy_samples(fsutil.join(src.run_url, "curated", f"{src.shard}.tar"), None, tar, keys=kept_keys)
    assert n == len(kept_keys), (n, len(kept_keys), src)
    commit.parquet(f"curated/{src.name}.parquet", curated.filter(pa.array(survivors)))
    stats = {"rows_read": len(keys), "kept": int(survivors.sum()), "dropped": int((~survivors).sum()),
             "dropped_by_reason": dict(sorted(by_method.items())), "errors": 0, "errors_by_kind": {}}
    assert stats["kept"] + stats["dropped"] == stats["rows_read"]
    return commit.commit(stats, input=fsutil.join(src.run_url, "curated", f"{src.shard}.tar"), run=src.run_url)


def count_groups(urls: list[str], methods: list[str], part: int, parts: int) -> dict:
    """Ray task: group sizes of the groups with ``group % parts == part``, overall and per method
    (a group of a method: a survivor and the duplicates that matched by it), as histograms. Holds
    the group ids of its part's duplicates (8 bytes each)."""
    groups, codes = [], []
    for url in urls:
        with fsutil.open_file(url) as f:
            t = pq.read_table(f, columns=["status", "group", "method"])
        t = t.filter(pc.equal(t.column("status"), "duplicate"))
        g = t.column("group").to_numpy()
        keep = g % parts == part
        groups.append(g[keep])
        names = np.array(t.column("method").to_pylist(), dtype=object)[keep]
        codes.append(np.array([methods.index(m) for m in names], dtype=np.int64))
    g, c = (np.concatenate(groups), np.concatenate(codes)) if groups else (np.zeros(0, np.int64),) * 2

    def hist(values: np.ndarray) -> Counter:
        _, counts = np.unique(values, return_counts=True)
        sizes, n = np.unique(counts + 1, return_counts=True)
        return Counter(dict(zip(sizes.tolist(), n.tolist())))

    return {"all": hist(g), **{m: hist(g[c == i]) for i, m in enumerate(methods)}}


def group_stats(out_root: str, names: list[str], methods: list[str], duplicates: int) -> dict:
    """Groups (a survivor and its duplicates) and their sizes, overall and per method: Ray tasks
    over the committed dedup files, each counting a part of the groups (about 50 M duplicates); the
    driver adds up histograms."""
    import ray

    urls = [fsutil.join(out_root, dedup_file(n)) for n in names]
    parts = max(1, -(-duplicates // 50_000_000))
    task = ray.remote(num_cpus=1)(count_groups)
    total = {k: Counter() for k in ("all", *methods)}
    for h in ray.get([task.remote(urls, methods, p, parts) for p in range(parts)]):
        for k, v in h.items():
            total[k].update(v)

    def summary(h: Counter) -> dict:
        return {"groups": sum(h.values()), "group_size_histogram": {str(k): v for k, v in sorted(h.items())}}

    return {**summary(total["all"]), "by_method": {m: summary(total[m]) for m in methods}}
