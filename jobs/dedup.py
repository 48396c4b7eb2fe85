"""``shardsmith dedup RUN [RUN ...] OUTPUT``: find exact, perceptual and semantic near-duplicates in
one or more curate outputs, and write the deduplicated set.

Each RUN is a curate OUTPUT (images or urls mode; ``--embeddings`` for the semantic method); its
kept rows are the input. Methods: ``exact`` (the same sha256 of the image bytes), ``phash`` (64-bit
perceptual hashes within ``--phash-max-distance`` bits), ``semantic`` (cosine of the CLIP image
embeddings >= ``--semantic-min-cosine``, SemDeDup-style: k-means on a sample, the pairs compared
within each cluster). A row is a duplicate when a better-ranked row matches it: the highest
aesthetic, then the largest original size, then the key (``--keep first-run``: an earlier RUN
always wins). OUTPUT receives dedup/S.parquet (every row: kept or duplicate, of which row, how),
curated/S.tar + .parquet (the survivors, bytes untouched, img2dataset layout), stats.json (groups,
group-size histogram, per method), manifest.json and report.html. A rerun resumes.

    python -m shardsmith.jobs.dedup RUN [RUN ...] OUTPUT      (the same as `shardsmith dedup`)
"""

from __future__ import annotations

import argparse

from shardsmith.jobs.entry import job_main

FLAGS = ("phash_max_distance", "phash_bands", "semantic_min_cosine", "keep", "buckets", "clusters", "kmeans_sample",
         "kmeans_iters", "probes", "block_rows", "seed", "address")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="curate OUTPUT folders (fsspec URLs), earlier first")
    p.add_argument("output", metavar="OUTPUT", help="the output folder (fsspec URL)")
    p.add_argument("--config", metavar="FILE", help="YAML config (DedupConfig keys); flags given here override it")
    p.add_argument("--methods", metavar="M,M", help="any of exact,phash,semantic (default all three)")
    p.add_argument("--phash-max-distance", type=int, metavar="T",
                   help="pHash Hamming distance (bits of 64) at most which two images are duplicates (default 10)")
    p.add_argument("--phash-bands", type=int, metavar="N",
                   help="bands the pHash is cut into for bucketing (default T + 1: every pair within T is found; "
                        "fewer, wider bands are faster and may miss pairs)")
    p.add_argument("--semantic-min-cosine", type=float, metavar="C",
                   help="cosine of the L2-normalised CLIP image embeddings at least which two images are "
                        "duplicates (default 0.95)")
    p.add_argument("--keep", choices=["quality", "first-run"],
                   help="survivor of a group: quality (default: highest aesthetic, then largest original size, then "
                        "key) or first-run (a row of an earlier RUN always wins, then quality)")
    p.add_argument("--buckets", type=int, help="exact/pHash buckets, the units of that stage (default from the rows)")
    p.add_argument("--clusters", type=int, help="k-means clusters for semantic (default about sqrt(rows))")
    p.add_argument("--kmeans-sample", type=int, help="embeddings k-means is fitted on (default max(64 k, 10000))")
    p.add_argument("--kmeans-iters", type=int, help="k-means iterations (default 20)")
    p.add_argument("--probes", type=int, help="nearest clusters each embedding is compared in (default 2)")
    p.add_argument("--block-rows", type=int,
                   help="rows of a cluster (or of a pHash group) compared at once; a larger one is split (default 4096)")
    p.add_argument("--seed", type=int, help="k-means seed (default 0)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray, or RAY_ADDRESS)")
    p.add_argument("--overwrite", action="store_true", help="redo everything in OUTPUT")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--no-report", action="store_true", help="do not write OUTPUT/report.html")


def config_from_args(args: argparse.Namespace):
    from shardsmith.pipelines.config.base import from_dict, load_config_file
    from shardsmith.pipelines.config.dedup import DedupConfig

    cfg = DedupConfig()
    if args.config:
        cfg = from_dict(DedupConfig, load_config_file(args.config), cfg, source=f"--config {args.config}")
    cfg.runs, cfg.output = list(args.runs), args.output
    for key in FLAGS:
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.methods is not None:
        cfg.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cfg.overwrite = cfg.overwrite or args.overwrite
    cfg.progress = cfg.progress and not args.quiet
    cfg.report = cfg.report and not args.no_report
    cfg.validate()
    return cfg


COMMITS_SHARDS = True


def run(args: argparse.Namespace) -> int:
    from shardsmith.pipelines.flows.dedup import run_dedup

    run_dedup(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.dedup", __doc__, add_arguments, run, argv, commits=COMMITS_SHARDS)


if __name__ == "__main__":
    raise SystemExit(main())
