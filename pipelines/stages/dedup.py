"""The Ray stages of ``shardsmith dedup``: each a plain function run as one Ray task per unit, each
unit committed through ``ShardCommit`` under a stage-prefixed name in the run's one ledger.

    kmeans          (1 unit)       k-means (faiss) on a sample: the first rows of every shard's
                                   embeddings, read alone (a ranged read on object storage)
    fp.S            (per shard)    the RUN's kept rows with their rank -> bucket keys for exact and
                                   pHash (sha256; the pHash cut in bands) and, for semantic, every
                                   embedding with its ``probes`` nearest clusters, sorted by cluster
    near.B          (per bucket)   rows sharing a sha256 or a pHash band: per row, the best-ranked
                                   row within the threshold (pHashes compared in bounded blocks)
    sem.A-B         (per pack)     clusters A..B, small enough to fit one block together: all pairs
    sem.C.I         (per block)    a larger cluster C: its rows I*block .. (I+1)*block against
                                   themselves and every later block; per row, the best-ranked row
                                   with cosine >= c
    best.S          (per shard)    per row of S, the best of what every bucket and block found

A row's *rank* orders a group for its survivor: a lower ``prio`` first (``--keep first-run``: the
RUN's position; else 0), then the higher aesthetic (none: last), the larger original size
(width x height), the smaller key, the earlier RUN, the smaller row id. A row is a duplicate when a
better-ranked row is within a method's threshold of it, which is decided pair by pair with no
global state (SemDeDup's rule), so every unit is independent and reruns give the same bytes.

Memory: a task holds one shard, one bucket, or two blocks of ``block_rows`` embeddings; the driver
holds none of the rows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardsmith.errors import InputError
from shardsmith.filters.fingerprint import hamming
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.core.commit import ShardCommit
from shardsmith.pipelines.formats.dedup import work_file
from shardsmith.pipelines.formats.embeddings import read_embedding_prefix, read_embeddings

EXACT, PHASH, SEMANTIC = 0, 1, 2
BIG = np.iinfo(np.int64).max
RANK = [("prio", pa.int32()), ("aes", pa.float32()), ("pixels", pa.int64()), ("key", pa.string()),
        ("run", pa.int32()), ("gid", pa.int64()), ("dst", pa.int32())]
TARGET = [("t_" + n, t) for n, t in RANK]
POINTER_SCHEMA = pa.schema([*RANK[-2:], *TARGET, ("method", pa.int8()), ("distance", pa.int32()),
                            ("similarity", pa.float32())])


@dataclass(frozen=True)
class DedupShard:
    """One shard of one RUN: the unit of the per-shard stages and of the output."""

    name: str  # its name in OUTPUT
    index: int  # its position in the plan (``dst`` in the work files)
    run: int  # the RUN's position on the command line
    run_url: str
    shard: str  # its name in the RUN
    base: int  # row id of its first row (row ids are unique across the run)
    rows: int  # the RUN's kept rows of this shard

    def to_dict(self) -> dict:
        return {"name": self.name, "run": self.run_url, "shard": self.shard, "rows": self.rows,
                "kind": "curated", "url": fsutil.join(self.run_url, "curated", f"{self.shard}.tar")}


def ordinal(t: pa.Table, prefix: str = "") -> np.ndarray:
    """Each row's position in rank order (0 = best) among the rows of ``t``."""
    aes = t.column(prefix + "aes").to_numpy(zero_copy_only=False).astype(np.float64)
    aes = np.where(np.isnan(aes), -np.inf, aes)
    keys = np.array(t.column(prefix + "key").to_pylist(), dtype=str)
    order = np.lexsort((t.column(prefix + "gid").to_numpy(), t.column(prefix + "run").to_numpy(), keys,
                        -t.column(prefix + "pixels").to_numpy(), -aes, t.column(prefix + "prio").to_numpy()))
    out = np.empty(len(order), np.int64)
    out[order] = np.arange(len(order))
    return out


def pointers(src: pa.Table, dst: pa.Table, method: int, distance=None, similarity=None) -> pa.Table:
    """Rows of ``src`` matched to rows of ``dst`` (row for row): POINTER_SCHEMA."""
    n = src.num_rows
    cols = {"gid": src.column("gid"), "dst": src.column("dst")}
    cols.update({"t_" + name: dst.column(name) for name, _ in RANK})
    cols["method"] = pa.array(np.full(n, method, np.int8))
    cols["distance"] = pa.array(np.broadcast_to(np.asarray(-1 if distance is None else distance, np.int32), (n,)))
    cols["similarity"] = pa.array(np.broadcast_to(np.asarray(np.nan if similarity is None else similarity,
                                                             np.float32), (n,)))
    return pa.table(cols, schema=POINTER_SCHEMA)


def empty_pointers() -> pa.Table:
    return POINTER_SCHEMA.empty_table()


# ---------------------------------------------------------------------------------------------
# fp.S: a shard's rows, their rank, bucket keys and cluster assignment
# ---------------------------------------------------------------------------------------------

def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def band_layout(bands: int) -> list[tuple[int, int]]:
    """(shift, width) of each band of the 64 pHash bits, the first band the most significant."""
    widths = [64 // bands + (1 if j < 64 % bands else 0) for j in range(bands)]
    out, top = [], 64
    for w in widths:
        top -= w
        out.append((top, w))
    return out


def shard_rows(src: DedupShard, needs_hashes: bool, keep_first: bool) -> pa.Table:
    """The RUN's kept rows of a shard in curated order, with their rank fields, sha256 and pHash."""
    with fsutil.open_file(fsutil.join(src.run_url, "curated", f"{src.shard}.parquet")) as f:
        keys = pq.read_table(f, columns=["key"]).column("key").cast(pa.string())
    if len(keys) != src.rows:
        raise InputError(f"{src.run_url}: curated/{src.shard}.parquet has {len(keys)} rows but its ledger says "
                         f"{src.rows}: the RUN changed or is damaged")
    url = fsutil.join(src.run_url, "scores", f"{src.shard}.parquet")
    with fsutil.open_file(url) as f:
        names = pq.read_schema(f).names
    if needs_hashes and not {"sha256", "phash"} <= set(names):
        raise InputError(f"{url} has no sha256/phash columns (curated before shardsmith had fingerprints): curate "
                         "the RUN again, or deduplicate it with --methods semantic")
    want = [c for c in ("key", "status", "aesthetic", "original_width", "original_height", "sha256", "phash")
            if c in names]
    with fsutil.open_file(url) as f:
        scores = pq.read_table(f, columns=want)
    scores = scores.filter(pc.equal(scores.column("status"), "kept"))
    position = {k: i for i, k in enumerate(scores.column("key").to_pylist())}
    take = [position.get(k) for k in keys.to_pylist()]
    if None in take:
        raise InputError(f"{url}: curated key {keys[take.index(None)]} is not a kept row of scores/: the RUN is damaged")
    s = scores.take(pa.array(take, pa.int64()))
    n = len(take)

    def col(name, typ):
        return s.column(name).cast(typ) if name in s.column_names else pa.nulls(n, typ)

    w = col("original_width", pa.int64()).to_numpy(zero_copy_only=False)
    h = col("original_height", pa.int64()).to_numpy(zero_copy_only=False)
    pixels = np.nan_to_num(w.astype(np.float64) * h.astype(np.float64), nan=0).astype(np.int64)
    return pa.table({"prio": pa.array(np.full(n, src.run if keep_first else 0, np.int32)),
                     "aes": col("aesthetic", pa.float32()).fill_null(np.nan), "pixels": pa.array(pixels),
                     "key": keys, "run": pa.array(np.full(n, src.run, np.int32)),
                     "gid": pa.array(np.arange(src.base, src.base + n, dtype=np.int64)),
                     "dst": pa.array(np.full(n, src.index, np.int32)),
                     "sha256": col("sha256", pa.string()), "phash": col("phash", pa.int64())})


def near_keys(rows: pa.Table, methods: list[str], bands: int, buckets: int) -> pa.Table:
    """One row per (row, key): kind 0 = the sha256, kind j = pHash band j; sorted by bucket."""
    parts = []
    base = rows.select([n for n, _ in RANK] + ["sha256", "phash"])
    if "exact" in methods:
        ok = base.filter(pc.is_valid(base.column("sha256")))
        prefix = np.frombuffer(bytes.fromhex("".join(h[:16] for h in ok.column("sha256").to_pylist())) or b"",
                               dtype=">u8").astype(np.uint64)
        parts.append((ok, 0, prefix))
    if "phash" in methods:
        ok = base.filter(pc.is_valid(base.column("phash")))
        ph = ok.column("phash").to_numpy().view(np.uint64)
        for j, (shift, width) in enumerate(band_layout(bands), start=1):
            parts.append((ok, j, (ph >> np.uint64(shift)) & np.uint64((1 << width) - 1)))
    tables = []
    for t, kind, value in parts:
        mixed = _splitmix(value ^ np.uint64(kind * 0x100000001B3))
        tables.append(t.append_column("kind", pa.array(np.full(t.num_rows, kind, np.int8)))
                      .append_column("value", pa.array(value, pa.uint64()))
                      .append_column("bucket", pa.array((mixed % np.uint64(buckets)).astype(np.int32))))
    if not tables:
        return None
    return pa.concat_tables(tables).sort_by([("bucket", "ascending"), ("kind", "ascending"), ("value", "ascending")])


def normalized(emb: np.ndarray) -> np.ndarray:
    x = emb.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fingerprint_shard(src: DedupShard, methods: list[str], bands: int, buckets: int, probes: int, keep_first: bool,
                      out_root: str) -> dict:
    """Stage fp.S: write the shard's bucket keys and cluster assignment; returns its ledger entry."""
    import faiss

    commit = ShardCommit(out_root, f"fp.{src.name}")
    near = [m for m in methods if m != "semantic"]
    rows = shard_rows(src, bool(near), keep_first)
    extra = {}
    if near:
        keys = near_keys(rows, near, bands, buckets)
        commit.parquet(work_file("near", f"{src.name}.parquet"), keys, row_group_size=16384)
    if "semantic" in methods:
        centroids = np.load(io.BytesIO(fsutil.read_bytes(fsutil.join(out_root, work_file("kmeans", "centroids.npy")))))
        meta, emb = read_embeddings(src.run_url, src.shard)
        position = {k: i for i, k in enumerate(meta.column("key").cast(pa.string()).to_pylist())}
        take = [position.get(k) for k in rows.column("key").to_pylist()]
        has = np.array([t is not None for t in take], dtype=bool)
        x = normalized(emb[np.array([t for t in take if t is not None], dtype=np.int64)])
        if x.shape[1] != centroids.shape[1]:
            raise InputError(f"{src.run_url}: embeddings of shard {src.shard} have {x.shape[1]} dimensions, the "
                             f"others {centroids.shape[1]}: deduplicate runs made with one CLIP model")
        index = faiss.IndexFlatIP(centroids.shape[1])
        index.add(centroids)
        p = min(probes, len(centroids))
        _, nearest = index.search(x, p) if len(x) else (None, np.zeros((0, p), np.int64))
        members = rows.select([n for n, _ in RANK]).filter(pa.array(has))
        pick = np.repeat(np.arange(len(x)), p)
        sem = members.take(pa.array(pick, pa.int64())).append_column(
            "cluster", pa.array(nearest.reshape(-1).astype(np.int32))).append_column(
            "probe", pa.array(np.tile(np.arange(p, dtype=np.int8), len(x)))).append_column(
            "emb", pa.FixedSizeListArray.from_arrays(pa.array(x[pick].astype(np.float16).reshape(-1)), x.shape[1]))
        sem = sem.sort_by([("cluster", "ascending"), ("gid", "ascending")])
        commit.parquet(work_file("sem", f"{src.name}.parquet"), sem, row_group_size=4096)
        with commit.open(work_file("sem", f"{src.name}.counts.npy")) as f:
            np.save(f, np.bincount(nearest.reshape(-1), minlength=len(centroids)).astype(np.int64))
        extra["without_embedding"] = int((~has).sum())
    n = rows.num_rows
    return commit.commit({"rows_read": n, "kept": n, "dropped": 0, "errors": 0, **extra})


# ---------------------------------------------------------------------------------------------
# kmeans: centroids fitted on a sample
# ---------------------------------------------------------------------------------------------

def fit_centroids(shards: list[DedupShard], k: int, sample: int, iters: int, seed: int, out_root: str) -> dict:
    """Stage kmeans: spherical k-means (faiss) on the first rows of every shard, as many from each
    as its share of the rows; writes the L2-normalised centroids (k, D) float32."""
    import faiss

    total = sum(s.rows for s in shards)
    parts = [read_embedding_prefix(s.run_url, s.shard, -(-sample * s.rows // max(total, 1))) for s in shards]
    dims = {p.shape[1] for p in parts}
    if len(dims) > 1:
        raise InputError(f"the RUNs' embeddings have different dimensions {sorted(dims)}: deduplicate runs made "
                         "with one CLIP model")
    x = normalized(np.concatenate(parts)[:sample])
    k = max(1, min(k, len(x)))
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed + 1, spherical=True, max_points_per_centroid=1 << 30,
                      min_points_per_centroid=1, verbose=False)
    km.train(x)
    centroids = normalized(km.centroids)
    commit = ShardCommit(out_root, "kmeans")
    with commit.open(work_file("kmeans", "centroids.npy")) as f:
        np.save(f, centroids)
    return commit.commit({"rows_read": len(x), "kept": len(x), "dropped": 0, "errors": 0, "k": k, "dim": x.shape[1]})


# ---------------------------------------------------------------------------------------------
# near.B: exact and pHash matches within a bucket
# ---------------------------------------------------------------------------------------------

def _read_filtered(urls: list[str], column: str, value: int, columns=None) -> pa.Table | None:
    tables = []
    for url in urls:
        with fsutil.open_file(url) as f:
            t = pq.read_table(f, filters=[(column, "=", value)], columns=columns)
        if t.num_rows:
            tables.append(t)
    return pa.concat_tables(tables) if tables else None


def _group_starts(*cols: np.ndarray) -> np.ndarray:
    change = np.zeros(len(cols[0]), dtype=bool)
    change[0:1] = True
    for c in cols:
        change[1:] |= c[1:] != c[:-1]
    return np.flatnonzero(change)


def phash_group_best(ph: np.ndarray, order: np.ndarray, t: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """For rows with pHashes ``ph`` and rank ordinals ``order``: per row, the index of the best-ranked
    row whose pHash is within ``t`` bits (itself when none is better) and that distance. Identical
    pHashes are one class; classes are compared ``block`` x ``block`` at a time, and only the few
    pairs within ``t`` are looked at further."""
    u, inv = np.unique(ph, return_inverse=True)
    by = np.lexsort((order, inv))
    first = by[_group_starts(inv[by])]  # the best row of each class
    cbest = order[first]
    best, arg, dist = cbest.copy(), np.arange(len(u)), np.zeros(len(u), np.int32)  # each class: itself
    for a in range(0, len(u), block):
        for b in range(0, len(u), block):
            d = hamming(u[a:a + block, None], u[None, b:b + block])
            r, c = np.nonzero(d <= t)
            r, c = r + a, c + b
            # per class r, its best-ranked neighbour class in this block (ties cannot happen: ranks differ)
            pick = np.lexsort((cbest[c], r))
            r, c = r[pick], c[pick]
            keep = _group_starts(r) if len(r) else np.zeros(0, np.int64)
            r, c = r[keep], c[keep]
            better = cbest[c] < best[r]
            r, c = r[better], c[better]
            best[r], arg[r], dist[r] = cbest[c], c, d[r - a, c - b]
    return first[arg][inv], dist[inv]


def near_bucket(bucket: int, urls: list[str], max_distance: int, block: int, out_root: str) -> dict:
    """Stage near.B: per row of the bucket, its best-ranked exact and pHash matches."""
    commit = ShardCommit(out_root, f"near.{bucket:05d}")
    t = _read_filtered(urls, "bucket", bucket)
    found = []
    if t is not None:
        order = ordinal(t)
        kind = t.column("kind").to_numpy()
        exact = np.flatnonzero(kind == 0)
        if len(exact):
            sha = np.array(t.column("sha256").take(pa.array(exact)).to_pylist(), dtype=str)
            by = exact[np.lexsort((order[exact], sha))]
            starts = _group_starts(sha[np.searchsorted(exact, by)])
            best = np.repeat(by[starts], np.diff(np.append(starts, len(by))))
            dup = best != by
            found.append(pointers(t.take(pa.array(by[dup])), t.take(pa.array(best[dup])), EXACT, distance=0))
        near = np.flatnonzero(kind > 0)
        value = t.column("value").to_numpy()
        by = near[np.lexsort((value[near], kind[near]))]
        starts = _group_starts(kind[by], value[by])
        ends = np.append(starts[1:], len(by))
        ph = t.column("phash").to_numpy()
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            g = by[s:e]
            target, dist = phash_group_best(ph[g], order[g], max_distance, block)
            dup = target != np.arange(len(g))
            if dup.any():
                found.append(pointers(t.take(pa.array(g[dup])), t.take(pa.array(g[target[dup]])), PHASH,
                                      distance=dist[dup]))
    out = pa.concat_tables(found) if found else empty_pointers()
    commit.parquet(work_file("pairs", f"near-{bucket:05d}.parquet"), out)
    return commit.commit({"rows_read": 0 if t is None else t.num_rows, "kept": 0 if t is None else t.num_rows,
                          "dropped": 0, "errors": 0, "pointers": out.num_rows})


def semantic_units(out_root: str, names: list[str], block: int) -> list[str]:
    """The semantic stage's units, from the cluster sizes (the sum of every shard's counts: k integers
    held, whatever the rows): ``sem.C.I`` for each block I of a cluster C larger than ``block``, and
    ``sem.A-B`` for a run of consecutive clusters A..B of at most ``block`` rows together."""
    total = None
    for n in names:
        c = np.load(io.BytesIO(fsutil.read_bytes(fsutil.join(out_root, work_file("sem", f"{n}.counts.npy")))))
        total = c if total is None else total + c
    units, lo, held = [], None, 0
    for c in np.flatnonzero(total >= 2).tolist():
        n = int(total[c])
        if n > block:
            units += [f"sem.{c:06d}.{i:04d}" for i in range(-(-n // block))]
            continue
        if lo is not None and held + n > block:
            units.append(f"sem.{lo:06d}-{last:06d}")
            lo, held = None, 0
        lo, held, last = (c if lo is None else lo), held + n, c
    if lo is not None:
        units.append(f"sem.{lo:06d}-{last:06d}")
    return units


def semantic_unit(unit: str) -> tuple[int, int, int]:
    """(first cluster, last cluster, block) of a unit name; block -1: a run of small clusters."""
    if "-" in unit:
        lo, hi = unit[4:].split("-")
        return int(lo), int(hi), -1
    c, i = unit[4:].split(".")
    return int(c), int(c), int(i)


def semantic_file(unit: str) -> str:
    lo, hi, first = semantic_unit(unit)
    return work_file("pairs", f"sem-{lo:06d}-{hi:06d}.parquet" if first < 0 else f"sem-{lo:06d}-b{first:04d}.parquet")


# ---------------------------------------------------------------------------------------------
# sem.C.I: cosine matches within a cluster, block I against itself and the later blocks
# ---------------------------------------------------------------------------------------------

def cluster_blocks(urls: list[str], cluster: int, block: int):
    """Cluster ``cluster``'s rows from every shard's assignment file, in shard order, as
    (table, float32 embeddings) blocks of ``block`` rows; at most a block and one shard's slice held."""
    buf: list[pa.Table] = []
    held = 0
    for url in urls:
        with fsutil.open_file(url) as f:
            t = pq.read_table(f, filters=[("cluster", "=", cluster)])
        while t.num_rows:
            take = min(block - held, t.num_rows)
            buf.append(t.slice(0, take))
            held += take
            t = t.slice(take)
            if held == block:
                yield _block(buf)
                buf, held = [], 0
    if held:
        yield _block(buf)


def _block(parts: list[pa.Table]) -> tuple[pa.Table, np.ndarray]:
    t = pa.concat_tables(parts).combine_chunks()
    emb = t.column("emb").combine_chunks()
    x = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), -1).astype(np.float32)
    return t.drop_columns(["emb", "cluster", "probe"]), x


def _best_matches(hit: np.ndarray, sims: np.ndarray, o_rows: np.ndarray, o_cols: np.ndarray):
    """Per row with a hit: the best-ranked hit column that ranks better than the row."""
    rows = np.flatnonzero(hit.any(1))
    if not len(rows):
        return rows, rows, np.zeros(0, np.float32)
    cand = np.where(hit[rows], o_cols[None, :], BIG)
    j = cand.argmin(1)
    ok = cand[np.arange(len(j)), j] < o_rows[rows]
    return rows[ok], j[ok], sims[rows[ok], j[ok]]


def _compare(tx: pa.Table, xx: np.ndarray, ty: pa.Table, xy: np.ndarray, same: bool, min_cosine: float):
    """Pointers between two blocks (or a block and itself): per row, its best-ranked better match."""
    order = ordinal(tx if same else pa.concat_tables([tx, ty]))
    ox, oy = (order, order) if same else (order[:tx.num_rows], order[tx.num_rows:])
    sims = xx @ xy.T
    hit = sims >= np.float32(min_cosine)
    if same:
        np.fill_diagonal(hit, False)
    r, c, s = _best_matches(hit, sims, ox, oy)
    out = [pointers(tx.take(pa.array(r)), ty.take(pa.array(c)), SEMANTIC, similarity=s)]
    if not same:
        r, c, s = _best_matches(hit.T, sims.T, oy, ox)
        out.append(pointers(ty.take(pa.array(r)), tx.take(pa.array(c)), SEMANTIC, similarity=s))
    return out


def cluster_block(unit: str, urls: list[str], min_cosine: float, block: int, out_root: str) -> dict:
    """Stage sem.A-B: the clusters A..B, each all pairs in memory (together they fit one block); or
    sem.C.I: block I of a larger cluster C against itself and every later block."""
    lo, hi, first = semantic_unit(unit)
    commit = ShardCommit(out_root, unit)
    found, compared, n = [], 0, 0
    if first < 0:
        parts = [_read_filtered_range(u, lo, hi) for u in urls]
        t = pa.concat_tables([p for p in parts if p.num_rows] or [_empty_sem()])
        t = t.sort_by([("cluster", "ascending"), ("gid", "ascending")]) if t.num_rows else t
        cl = t.column("cluster").to_numpy()
        starts = _group_starts(cl) if len(cl) else np.zeros(0, np.int64)
        for s, e in zip(starts, np.append(starts[1:], len(cl))):
            tx, xx = _block([t.slice(s, e - s)])
            found += _compare(tx, xx, tx, xx, True, min_cosine)
            compared += int(e - s) ** 2
            n += int(e - s)
    else:
        mine = None
        for j, (ty, xy) in enumerate(cluster_blocks(urls, lo, block)):
            if j < first:
                continue
            mine = mine or (ty, xy)
            found += _compare(*mine, ty, xy, j == first, min_cosine)
            compared += mine[0].num_rows * ty.num_rows
        n = 0 if mine is None else mine[0].num_rows
    out = pa.concat_tables(found) if found else empty_pointers()
    commit.parquet(semantic_file(unit), out)
    return commit.commit({"rows_read": n, "kept": n, "dropped": 0, "errors": 0, "pairs_compared": int(compared),
                          "pointers": out.num_rows})


def _read_filtered_range(url: str, lo: int, hi: int) -> pa.Table:
    with fsutil.open_file(url) as f:
        return pq.read_table(f, filters=[("cluster", ">=", lo), ("cluster", "<=", hi)])


def _empty_sem() -> pa.Table:
    return pa.table({**{n: pa.array([], t) for n, t in RANK}, "cluster": pa.array([], pa.int32()),
                     "probe": pa.array([], pa.int8()),
                     "emb": pa.FixedSizeListArray.from_arrays(pa.array([], pa.float16()), 1)})


# ---------------------------------------------------------------------------------------------
# best.S: per row of a shard, the best match over every bucket and block
# ---------------------------------------------------------------------------------------------

def best_pointers(src: DedupShard, pair_urls: list[str], out_root: str) -> dict:
    commit = ShardCommit(out_root, f"best.{src.name}")
    t = _read_filtered(pair_urls, "dst", src.index)
    if t is None or not t.num_rows:
        best = empty_pointers()
    else:
        # per row: the best-ranked target, and of several matches to it the first method
        aes = t.column("t_aes").to_numpy(zero_copy_only=False).astype(np.float64)
        by = np.lexsort((t.column("method").to_numpy(), t.column("t_gid").to_numpy(), t.column("t_run").to_numpy(),
                         np.array(t.column("t_key").to_pylist(), dtype=str), -t.column("t_pixels").to_numpy(),
                         -np.where(np.isnan(aes), -np.inf, aes), t.column("t_prio").to_numpy(),
                         t.column("gid").to_numpy()))
        gid = t.column("gid").to_numpy()[by]
        best = t.take(pa.array(by[_group_starts(gid)]))
    commit.parquet(work_file("best", f"{src.name}.parquet"), best)
    return commit.commit({"rows_read": src.rows, "kept": src.rows - best.num_rows, "dropped": best.num_rows,
                          "errors": 0})
