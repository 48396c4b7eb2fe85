"""``recurate_rows_per_s``: re-curating a finished run (a changed threshold and one new head from
its stored embeddings) against the curate run that made it, on the same data.

One curate run with ``--embeddings`` (ViT-B-32, random weights, all four scores; timed end to end
as in bench/scoring.py: ``run_curate()`` call to return, Ray already running, no report), then
``repeats`` recurate runs of it into fresh outputs (``run_recurate()`` call to return: manifest and
head checks, one Ray task per shard reading scores + embeddings, the new head, the rules, the
scores parquet, the curated tar copied from the input shards, the commit). The figure is the
recurate's median rows/s over the curate's rows/s: what re-deciding costs next to re-embedding.
"""

from __future__ import annotations

import os
import shutil
import time

from bench import data as bdata
from bench.measure import figure, median, rnd, say


def new_head(work: str) -> str:
    import torch

    path = os.path.join(work, "heads", "pnew-linear.pth")
    if not os.path.exists(path):
        torch.manual_seed(5)
        torch.save(torch.nn.Linear(bdata.EMBED_DIM, 1).state_dict(), path)
    return path


def run(info: dict, heads: dict, work: str, batch: int, repeats: int = 5) -> dict:
    from shardsmith.pipelines.config import CurateConfig
    from shardsmith.pipelines.config.recurate import RecurateConfig
    from shardsmith.pipelines.flows.curate import run_curate
    from shardsmith.pipelines.flows.recurate import run_recurate

    quiet = {"log": lambda *a: None}
    run_dir = os.path.join(work, "recurate-run")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = CurateConfig(input=bdata.shard_urls(info), output=run_dir, clip_model=bdata.CLIP_MODEL, clip_pretrained=None,
                       batch_size=batch, embeddings=True, report=False, progress=False, **heads)
    say(f"recurate: the curate run it starts from ({info['images']} images, --embeddings)")
    t0 = time.perf_counter()
    stats = run_curate(cfg, **quiet)
    curate_s = time.perf_counter() - t0
    rows = stats["rows_read"]
    curate_rate = rows / curate_s
    say(f"  curate: {rows} rows in {curate_s:.1f} s = {curate_rate:.2f} rows/s")
    head = {"pnew": {"arch": "linear", "weights": new_head(work)}}
    # a threshold that keeps about half (the random heads' scale is arbitrary): the kept samples are copied
    import glob

    import numpy as np
    import pyarrow.parquet as pq

    aes = np.concatenate([pq.read_table(f, columns=["aesthetic"]).column("aesthetic").to_numpy(zero_copy_only=False)
                          for f in sorted(glob.glob(os.path.join(run_dir, "scores", "*.parquet")))])
    threshold = float(np.nanmedian(aes))
    rates, seconds = [], []
    for i in range(repeats):
        out = os.path.join(work, f"recurate-out-{i}")
        shutil.rmtree(out, ignore_errors=True)
        rc = RecurateConfig(run=run_dir, output=out, rules=[f"aesthetic >= {threshold:.6g}", "pwatermark < 0.9"], heads=head,
                            report=False, progress=False)
        t0 = time.perf_counter()
        rs = run_recurate(rc, **quiet)
        s = time.perf_counter() - t0
        assert rs["rows_read"] == rows, rs
        seconds.append(s)
        rates.append(rows / s)
        say(f"  recurate: {rows} rows in {s:.2f} s = {rows / s:.1f} rows/s (kept {rs['kept']} of {rows})")
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    value = median(rates) / curate_rate
    return {"recurate_rows_per_s": figure(
        value, 10.0, rows_per_s=round(median(rates), 1), recurate_rows_per_s=rnd(rates, 1),
        recurate_seconds=rnd(seconds, 2), threshold=threshold, curate_rows_per_s=round(curate_rate, 3), curate_seconds=round(curate_s, 1),
        rows=rows, shards=info["shards"],
        what="value = recurate rows/s (median of the runs) / the curate rows/s of the run it re-decides; "
             "recurate: a changed threshold + one new linear head from the stored fp16 embeddings",
        included="run_curate() / run_recurate() wall time, Ray already running, no HTML report")}
