"""``shardsmith download INPUT OUTPUT``: fetch the URLs of LAION metadata parquet into
img2dataset-layout shards, without scoring.

INPUT: LAION metadata parquet files (``URL, TEXT, WIDTH, HEIGHT, ...`` in any letter case; a
folder, glob or brace pattern, any fsspec URL). OUTPUT receives, per shard of ``--urls-per-shard``
rows, ``NNNNN.tar`` (``KEY.jpg|png|webp``, ``KEY.txt``, ``KEY.json``) and ``NNNNN.parquet`` (every
row: status success | skipped | failed_to_download, error_message, reason, sizes, sha256), plus
stats.json (kept = fetched). ``--rule`` rules run on the metadata before any fetch. A rerun resumes;
``--retry-failed`` re-fetches only the retryable failures. ``shardsmith curate OUTPUT ...`` scores
the result later (every row accounted for), as does any img2dataset consumer.

This is the download step of ``shardsmith curate --mode urls``, which fetches and scores in one run.

    python -m shardsmith.jobs.download INPUT OUTPUT [options]      (the same as `shardsmith download`)
"""

from __future__ import annotations

import argparse

from shardsmith.filters.presets import PRESETS
from shardsmith.jobs.curate import FLAG_KEYS, add_fetch_arguments
from shardsmith.jobs.entry import add_run_arguments, apply_run_arguments, job_main


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="LAION metadata parquet (fsspec URL, glob, {a,b} patterns)")
    p.add_argument("output", help="output folder for the img2dataset-layout shards (fsspec URL)")
    p.add_argument("--config", metavar="FILE", help="YAML config (curate's keys); flags given here override it")
    p.add_argument("--preset", choices=sorted(PRESETS), help="rule preset applied to the metadata (default none)")
    p.add_argument("--rule", action="append", default=None, metavar="RULE",
                   help="metadata rule, e.g. 'punsafe < 0.5' or 'min_side >= 256' (repeatable): rejected rows are "
                        "not fetched")
    p.add_argument("--max-image-pixels", type=int, help="refuse images declaring more pixels (decompression bombs)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray, or RAY_ADDRESS)")
    p.add_argument("--overwrite", action="store_true", help="redo everything in OUTPUT")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_run_arguments(p)
    add_fetch_arguments(p)


def config_from_args(args: argparse.Namespace, validate: bool = True):
    from shardsmith.pipelines.config import CurateConfig, config_from_dict, load_config_file

    cfg = CurateConfig(preset=None, mode="urls")
    if args.config:
        cfg = config_from_dict(load_config_file(args.config), cfg, source=f"--config {args.config}")
    cfg.input, cfg.output, cfg.mode = args.input or cfg.input, args.output or cfg.output, "urls"
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(cfg, key, value)
    if args.rule:
        cfg.rules = list(cfg.rules) + args.rule
    if cfg.preset == "none":
        cfg.preset = None
    cfg.overwrite = cfg.overwrite or args.overwrite
    cfg.progress = cfg.progress and not args.quiet
    if args.allow_private_addresses:
        cfg.allow_private_addresses = True
    if args.retry_failed:
        cfg.retry_failed = True
    if args.retry_kinds:
        cfg.retry_kinds = [k.strip() for k in args.retry_kinds.split(",") if k.strip()]
    apply_run_arguments(args, cfg)
    if validate:
        cfg.validate()
    return cfg


COMMITS_SHARDS = True


def run(args: argparse.Namespace) -> int:
    from shardsmith.pipelines.flows.download import run_download

    run_download(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.download", __doc__, add_arguments, run, argv, commits=COMMITS_SHARDS)


if __name__ == "__main__":
    raise SystemExit(main())
