"""Figures 7-8: ``shardsmith dedup`` on synthetic curate outputs: the driver's memory at 10x the rows,
rows/s per method, and the recall of the clustered semantic search against exact all-pairs.

The inputs are written as a curate OUTPUT would be (manifest, ledger stats, scores/ with sha256 and
pHash, curated/ parquet + tar, img_emb/ + metadata/), with no image decoding: the rows carry
synthetic fingerprints and embeddings. Embeddings are drawn as CLIP's are shaped: unit vectors
around 2,000 topics (a row's cosine to its topic ~0.7, unrelated rows ~0), with planted duplicates:
1 % of the rows share another's sha256, 1 % are within 4 pHash bits of another, 1 % are another's
embedding moved to cosine 0.96-0.99.

- ``dedup_driver_memory_10x``: the peak RSS of this process (the dedup driver) at 10x the rows over
  its peak at 1x (the larger of two 1x runs, before and after), all three methods; each run's peak
  is also given as its growth above the idle baseline (Ray up, modules imported, just before the
  run), which is what would grow with the rows if anything did.
- ``dedup_semantic_recall``: on a random subset of the rows, the pairs exact all-pairs search finds
  at the run's cosine, and the share of them that the clustered search compares (both rows in one
  of the clusters they were assigned to; within a cluster every pair is compared). Also with one
  probe (the nearest cluster only), which is what SemDeDup does.
- extras: rows/s for each method alone, end to end (``run_dedup()``: every stage, the outputs
  written; Ray already running).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.measure import figure, say
from bench.procmem import rss_bytes


def make_run(root: str, rows: int, shards: int, dim: int, seed: int = 0) -> str:
    """A synthetic curate OUTPUT of ``rows`` kept rows in ``shards`` shards (cached)."""
    if os.path.exists(os.path.join(root, "stats.json")):
        return root
    from shardsmith.pipelines.formats.tar import TarWriter

    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(2000, dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    per = -(-rows // shards)
    stats = {"mode": "images", "shards": {}}
    n_dup = max(1, rows // 100)
    for s in range(shards):
        n = min(per, rows - s * per)
        name = f"{s:05d}"
        keys = [f"{name}{i:07d}" for i in range(n)]
        emb = topics[rng.integers(0, len(topics), n)] + rng.normal(scale=0.85 / np.sqrt(dim), size=(n, dim))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        sha = [hashlib.sha256(k.encode()).hexdigest() for k in keys]
        ph = rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64)
        src = rng.integers(0, n, (3, n_dup // shards + 1))
        dst = rng.integers(0, n, (3, n_dup // shards + 1))
        for a, b in zip(*src[:1], *dst[:1]):
            sha[b] = sha[a]  # same bytes
        flips = rng.integers(0, 64, (len(dst[1]), 4))
        for a, b, f in zip(src[1], dst[1], flips):
            ph[b] = ph[a] ^ np.bitwise_or.reduce(np.left_shift(np.int64(1), f.astype(np.int64)))
        for a, b in zip(src[2], dst[2]):  # a near copy: cosine 0.96-0.99
            noise = rng.normal(size=dim)
            noise -= (noise @ emb[a]) * emb[a]
            c = rng.uniform(0.96, 0.99)
            emb[b] = c * emb[a] + np.sqrt(1 - c * c) * noise / np.linalg.norm(noise)
        t = pa.table({"key": keys, "row": np.arange(n), "status": ["kept"] * n,
                      "aesthetic": rng.normal(5, 1, n).astype(np.float32),
                      "original_width": rng.integers(200, 2000, n), "original_height": rng.integers(200, 2000, n),
                      "sha256": sha, "phash": ph})
        for d in ("scores", "curated", "img_emb", "metadata"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        pq.write_table(t, os.path.join(root, "scores", f"{name}.parquet"))
        pq.write_table(t.select(["key"]), os.path.join(root, "curated", f"{name}.parquet"))
        pq.write_table(t.select(["key"]), os.path.join(root, "metadata", f"metadata_{name}.parquet"))
        np.save(os.path.join(root, "img_emb", f"img_emb_{name}.npy"), emb.astype(np.float16))
        with open(os.path.join(root, "curated", f"{name}.tar"), "wb") as f, TarWriter(f) as tar:
            for k in keys:
                tar.add(f"{k}.jpg", b"x")
        stats["shards"][name] = {"rows_read": n, "kept": n, "dropped": 0, "errors": 0}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"tool": "shardsmith curate", "fingerprint": {"mode": "images"}}, f)
    with open(os.path.join(root, "stats.json"), "w") as f:
        json.dump(stats, f)
    return root


class DriverPeak:
    """Peak RSS of this process (``absolute``) and above the RSS when it started (``peak``), sampled
    every 0.1 s."""

    def __init__(self):
        self.base = rss_bytes(os.getpid())
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(os.getpid()) - self.base)
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(os.getpid()) - self.base)
        self.absolute = self.base + self.peak


def dedup_run(run: str, out: str, **kw) -> tuple[dict, float, int]:
    from shardsmith.pipelines.config.dedup import DedupConfig
    from shardsmith.pipelines.flows.dedup import run_dedup

    shutil.rmtree(out, ignore_errors=True)
    with DriverPeak() as mem:
        t0 = time.perf_counter()
        stats = run_dedup(DedupConfig(runs=[run], output=out, progress=False, report=False, **kw),
                          log=lambda *a: None)
        seconds = time.perf_counter() - t0
    return stats, seconds, mem


def semantic_recall(run: str, out: str, min_cosine: float, subset: int, seed: int = 0) -> dict:
    """Exact all-pairs on ``subset`` random rows vs the clusters the run put them in."""
    from shardsmith.pipelines.formats.embeddings import iter_embeddings

    embs = np.concatenate([e.astype(np.float32) for _, _, e in iter_embeddings(run)])
    embs /= np.linalg.norm(embs, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    # a random subset: it holds both rows of the planted pairs that fell in it (~4 % of them at 20,000
    # of 100,000 rows) and any unplanted pair above the cosine
    pick = np.sort(rng.choice(len(embs), min(subset, len(embs)), replace=False))
    x = embs[pick]
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    i, j = np.nonzero(np.triu(sims >= np.float32(min_cosine)))
    clusters: dict[int, list] = {}
    for f in glob.glob(os.path.join(out, "_work", "sem", "*.parquet")):
        t = pq.read_table(f, columns=["gid", "cluster", "probe"])
        keep = np.isin(t.column("gid").to_numpy(), pick)
        for g, c, p in zip(*(t.column(n).to_numpy()[keep] for n in ("gid", "cluster", "probe"))):
            clusters.setdefault(int(g), []).append((int(p), int(c)))
    gids = pick  # one RUN: row ids are the rows' positions
    both = [bool({c for _, c in clusters[gids[a]]} & {c for _, c in clusters[gids[b]]}) for a, b in zip(i, j)]
    nearest = [min(clusters[gids[a]])[1] == min(clusters[gids[b]])[1] for a, b in zip(i, j)]
    return {"pairs_exact": int(len(i)), "found": int(sum(both)), "recall": sum(both) / max(len(i), 1),
            "recall_one_probe": sum(nearest) / max(len(i), 1), "subset_rows": int(len(pick))}


def run(work: str, rows_1x: int, memory_dim: int, rate_rows: int, rate_dim: int) -> dict:
    say(f"dedup: synthetic curate outputs ({rows_1x:,} and {10 * rows_1x:,} rows at {memory_dim} d; {rate_rows:,} "
        f"rows at {rate_dim} d), built once")
    small = make_run(os.path.join(work, f"dedup-{rows_1x}-{memory_dim}"), rows_1x, 4, memory_dim)
    big = make_run(os.path.join(work, f"dedup-{10 * rows_1x}-{memory_dim}"), 10 * rows_1x, 40, memory_dim)
    rate = make_run(os.path.join(work, f"dedup-{rate_rows}-{rate_dim}"), rate_rows, 10, rate_dim, seed=1)
    out = os.path.join(work, "dedup-out")
    dedup_run(small, out)  # warm-up: Ray's workers started, imports done (untimed)
    peaks = {}
    for name, run_dir in (("1x", small), ("10x", big), ("1x_again", small)):
        stats, seconds, mem = dedup_run(run_dir, out)
        peaks[name] = {"rows": stats["rows_read"], "seconds": round(seconds, 2), "peak_rss_bytes": mem.absolute,
                       "idle_rss_bytes": mem.base, "peak_rss_above_idle_bytes": mem.peak,
                       "rows_per_s": round(stats["rows_read"] / seconds), "duplicates": stats["dropped"]}
        say(f"  all methods, {stats['rows_read']:,} rows: {seconds:.1f} s, driver peak {mem.absolute / 2**20:.0f} MiB "
            f"(+{mem.peak / 2**20:.1f} MiB above idle)")
    base = max(peaks["1x"]["peak_rss_bytes"], peaks["1x_again"]["peak_rss_bytes"])
    rates = {}
    for method in ("exact", "phash", "semantic"):
        stats, seconds, _ = dedup_run(rate, out, methods=[method], keep_work=method == "semantic")
        rates[method] = {"rows": stats["rows_read"], "seconds": round(seconds, 2),
                         "rows_per_s": round(stats["rows_read"] / seconds), "duplicates": stats["dropped"]}
        say(f"  {method} alone, {stats['rows_read']:,} rows at {rate_dim} d: {seconds:.1f} s = "
            f"{stats['rows_read'] / seconds:,.0f} rows/s, {stats['dropped']:,} duplicates")
    recall = semantic_recall(rate, out, 0.95, 20_000)
    say(f"  semantic recall vs exact all-pairs on {recall['subset_rows']:,} rows: {recall['recall']:.4f} "
        f"({recall['found']}/{recall['pairs_exact']} pairs; one probe: {recall['recall_one_probe']:.4f})")
    shutil.rmtree(out, ignore_errors=True)
    return {
        "dedup_driver_memory_10x": figure(
            peaks["10x"]["peak_rss_bytes"] / base, 1.2, higher_is_better=False, runs=peaks,
            what="peak RSS of the dedup driver (this process), 10x rows / 1x (the larger of two 1x runs, before and "
                 "after); all three methods, Ray already running; each run's growth above its idle baseline in runs"),
        "dedup_semantic_recall": figure(
            recall["recall"], 0.99, **recall, rates=rates,
            what="share of the pairs exact all-pairs search finds (cosine >= 0.95) on a random subset that the "
                 "clustered search compares (the rows share one of their 2 nearest clusters); rates: each method "
                 "alone, run_dedup() end to end")}
