"""Figure 5: metadata-only curate against one pyarrow filter of the same predicate on the same
parquet, alternating pyarrow, curate, pyarrow, curate, pyarrow.

The pyarrow side is what one would write by hand for LAION-Aesthetics 5+: per file,
``pq.read_table`` -> ``table.filter(AESTHETIC_SCORE >= 5 & pwatermark < 0.8 & punsafe < 0.5)`` ->
``pq.write_table(zstd)`` of the kept rows, one file after the other in this process (pyarrow's own
threads for reading). curate does more: every row's status and reason in ``scores/`` (with its
url and caption), the kept rows in ``curated/``, stats, ledger; it runs the files as Ray tasks
(``run_curate()`` wall time, Ray already running, no HTML report).
"""

from __future__ import annotations

import os
import shutil
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.measure import figure, median, paired_ratios, rnd, say


def pyarrow_filter(paths: list[str], out: str) -> tuple[int, float]:
    os.makedirs(out, exist_ok=True)
    expr = (pc.field("AESTHETIC_SCORE") >= 5) & (pc.field("pwatermark") < 0.8) & (pc.field("punsafe") < 0.5)
    rows = 0
    t0 = time.perf_counter()
    for p in paths:
        t = pq.read_table(p)
        pq.write_table(t.filter(expr), os.path.join(out, os.path.basename(p)), compression="zstd")
        rows += t.num_rows
    return rows, time.perf_counter() - t0


def curate_filter(meta_dir: str, out: str) -> tuple[int, float]:
    from shardsmith.pipelines.config import CurateConfig
    from shardsmith.pipelines.flows.curate import run_curate

    shutil.rmtree(out, ignore_errors=True)
    cfg = CurateConfig(input=meta_dir, output=out, mode="metadata", preset="laion-aesthetics-5plus",
                       report=False, progress=False)
    t0 = time.perf_counter()
    stats = run_curate(cfg, log=lambda *a: None)
    return stats["rows_read"], time.perf_counter() - t0


def run(meta: dict, work: str) -> dict:
    pa_out, cu_out = os.path.join(work, "pyarrow-out"), os.path.join(work, "metadata-out")
    paths = sorted(meta["paths"])

    def pa_rate() -> float:
        n, s = pyarrow_filter(paths, pa_out)
        shutil.rmtree(pa_out, ignore_errors=True)
        say(f"  pyarrow filter: {n} rows in {s:.2f} s = {n / s:,.0f} rows/s")
        return n / s

    def cu_rate() -> float:
        n, s = curate_filter(meta["dir"], cu_out)
        shutil.rmtree(cu_out, ignore_errors=True)
        say(f"  curate (metadata mode): {n} rows in {s:.2f} s = {n / s:,.0f} rows/s")
        return n / s

    say(f"metadata: {meta['rows']:,} rows in {meta['files']} LAION parquet files; warm-up (both sides, untimed: "
        "the files in the page cache, Ray's workers started)")
    pyarrow_filter(paths, pa_out)
    shutil.rmtree(pa_out, ignore_errors=True)
    curate_filter(meta["dir"], cu_out)
    shutil.rmtree(cu_out, ignore_errors=True)
    p = [pa_rate()]
    c = []
    for _ in range(2):
        c.append(cu_rate())
        p.append(pa_rate())
    ratios = paired_ratios(c, p)
    return {"metadata_filter_rows_per_s": figure(
        median(ratios), 0.5, rows_per_s=round(median(c)), curate_rows_per_s=rnd(c, 0),
        pyarrow_rows_per_s=rnd(p, 0), ratios=rnd(ratios, 4), rows=meta["rows"], files=meta["files"],
        predicate="laion-aesthetics-5plus: AESTHETIC_SCORE >= 5, pwatermark < 0.8, punsafe < 0.5",
        what="value = curate rows/s / pyarrow rows/s (read_table -> filter -> write_table zstd of the kept rows, "
             "file by file); rows_per_s = curate's median rows/s",
        included="run_curate() wall time in metadata mode (scores/ for every row + curated/ + stats + ledger), "
                 "Ray already running, no HTML report")}
