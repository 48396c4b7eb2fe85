"""Figures 1-3: curate against the bare models, against single-purpose tools, and its memory.

One sequence, alternating the sides on the same data in the same process (the curate driver is
this process; Ray is already running, as on a cluster):

    bare, CURATE(10x), single-purpose, CURATE(1x), bare, CURATE(10x), single-purpose, bare

- ``scoring_efficiency``: each 10x curate run's images/s over the mean of the bare-models rates
  measured just before and after it; the median of the two.
- ``speedup_vs_single_purpose``: each 10x curate run's images/s over the single-purpose rate
  measured right after it; the median.
- ``memory_growth_10x``: the larger peak RSS (summed over every Ray process) of the two 10x runs
  over the 1x run's.

A curate run is timed end to end: ``run_curate()`` from its call to its return — the driver's
model and head checks, shard planning, output manifest, the actor pool start (model load), read,
decode, score, the writer tasks and the commits. Not included: starting Ray (done once, reported
apart) and the HTML report (off: ``--no-report``).
"""

from __future__ import annotations

import os
import shutil
import time

import torch

from bench import data as bdata
from bench.loops import BareModels, Models, SinglePurposeTools
from bench.measure import figure, load_average, median, paired_ratios, rnd, say
from bench.procmem import PeakRss


def curate_run(info: dict, shards: int, out: str, heads: dict, batch: int, **extra) -> dict:
    """One curate run over the first ``shards`` shards; rate, wall time and peak RSS."""
    from shardsmith.pipelines.config import CurateConfig
    from shardsmith.pipelines.flows.curate import run_curate

    shutil.rmtree(out, ignore_errors=True)
    cfg = CurateConfig(input=bdata.shard_urls(info, 0, shards), output=out, clip_model=bdata.CLIP_MODEL,
                       clip_pretrained=None, batch_size=batch, report=False, progress=False, **heads, **extra)
    load = load_average()
    with PeakRss(root_growth_only=True) as mem:
        t0 = time.perf_counter()
        stats = run_curate(cfg, log=lambda *a: None)
        seconds = time.perf_counter() - t0
    n = stats["rows_read"]
    assert stats["errors"] == 0 and n == shards * info["per_shard"], stats
    shutil.rmtree(out, ignore_errors=True)
    return {"images": n, "seconds": round(seconds, 2), "images_per_s": n / seconds,
            "peak_rss_bytes": mem.peak, "processes_at_peak": mem.peak_processes, "load_average_before": load}


def run(info: dict, heads: dict, work: str, threads: int, batch: int, quick: bool = False) -> dict:
    """Figures 1-3; returns {name: figure}."""
    torch.set_num_threads(threads)
    samples = list(bdata.iter_samples(info, 2))
    jpegs, captions = [s[0] for s in samples], [s[1] for s in samples]
    say(f"scoring: loading {bdata.CLIP_MODEL} (random weights) and the heads for the reference loops")
    models = Models(bdata.CLIP_MODEL, heads)
    bare = BareModels(models, jpegs, captions, batch)
    tools = SinglePurposeTools(models, jpegs[:batch], captions[:batch], batch)
    bare_batches = 1 if quick else 2
    ten, one = info["shards"], max(1, info["shards"] // 10)
    out = os.path.join(work, "curate-out")

    def bare_rate() -> float:
        n, s = bare.run(bare_batches)
        say(f"  bare models: {n} images in {s:.1f} s = {n / s:.2f} images/s")
        return n / s

    def tools_rate() -> float:
        n, s = tools.run(1)
        say(f"  single-purpose tools: {n} images in {s:.1f} s = {n / s:.2f} images/s")
        return n / s

    def curate(shards: int) -> dict:
        r = curate_run(info, shards, out, heads, batch)
        say(f"  curate ({shards} shards): {r['images']} images in {r['seconds']:.1f} s = "
            f"{r['images_per_s']:.2f} images/s, peak RSS of the Ray processes {r['peak_rss_bytes'] / 2**30:.2f} GiB")
        return r

    say(f"scoring: warm-up forward ({batch} images, {threads} torch thread(s))")
    bare.run(1)
    b = [bare_rate()]
    c10 = [curate(ten)]
    sp = [tools_rate()]
    c1 = curate(one)
    b.append(bare_rate())
    c10.append(curate(ten))
    sp.append(tools_rate())
    b.append(bare_rate())

    rates10 = [r["images_per_s"] for r in c10]
    eff = paired_ratios(rates10, b)
    speed = [c / s for c, s in zip(rates10, sp)]
    peak10 = max(r["peak_rss_bytes"] for r in c10)
    common = {"torch_threads": threads, "batch_size": batch, "model": f"open_clip {bdata.CLIP_MODEL}, random weights",
              "curate_runs_10x": [{k: (rnd(v) if isinstance(v, float) else v) for k, v in r.items()} for r in c10]}
    return {
        "scoring_efficiency": figure(
            median(eff), 0.90, ratios=rnd(eff, 4),
            curate_images_per_s=rnd(rates10), bare_models_images_per_s=rnd(b),
            what="curate end-to-end images/s (all four scores) / bare models images/s (encode_image + "
                 "encode_text + 3 heads on preprocessed tensors and tokenized captions, same model, batch size, "
                 "torch threads), alternating bare, curate, bare",
            included="run_curate() wall time: driver checks (model on the meta device, heads), planning, actor "
                     "start and model load, read + decode + score, writer tasks, commit; Ray already running, "
                     "no HTML report",
            **common),
        "speedup_vs_single_purpose": figure(
            median(speed), 2.5, ratios=rnd(speed, 4), curate_images_per_s=rnd(rates10),
            single_purpose_images_per_s=rnd(sp),
            what="curate images/s / a loop of four single-purpose tools (each opens, decodes and preprocesses "
                 "the image with open_clip's preprocess and runs its own image forward; the similarity tool also "
                 "tokenizes and encodes the caption); FLOP bound for ViT-B-32 about 2.8x",
            **common),
        "memory_growth_10x": figure(
            peak10 / c1["peak_rss_bytes"], 1.2, higher_is_better=False,
            peak_rss_bytes_10x=[r["peak_rss_bytes"] for r in c10], peak_rss_bytes_1x=c1["peak_rss_bytes"],
            images_10x=c10[0]["images"], images_1x=c1["images"], curate_run_1x={k: (rnd(v) if isinstance(v, float)
                                                                               else v) for k, v in c1.items()},
            what="peak RSS summed over every Ray process (GCS, raylet, agents, workers, actors; the driver counted "
                 "for what it grows during the run), sampled twice a second from /proc, at 10x the data / at 1x; the larger "
                 "of the two 10x runs"),
    }
