"""``shardsmith curate INPUT OUTPUT``: score and filter a LAION-style dataset on Ray.

INPUT is an fsspec URL (local path, file://, s3://, gs://, http(s)://, memory://): a folder of
img2dataset webdataset shards (NNNNN.tar + optional NNNNN.parquet), a glob or brace pattern of
them, or LAION metadata parquet files (metadata-only mode: the rules apply to the score columns
already there, no image is read). OUTPUT receives, per input shard, scores/NNNNN.parquet (every
row: status kept|dropped|error, reason, error, scores) and curated/NNNNN.tar + .parquet (the kept
samples, bytes untouched), plus stats.json and manifest.json. A rerun resumes: committed shards
are skipped; --overwrite redoes them.

--mode urls reads LAION metadata parquet as images to fetch: metadata rules first (rejected rows
are never requested), then the URLs are fetched politely (timeouts, retries for 5xx/429/resets
only, X-Robots-Tag noai opt-outs), stored in OUTPUT/downloaded/ (img2dataset layout) and scored
like any shard; every row ends kept, dropped or error with its fetch kind. --retry-failed re-fetches
only the earlier failures of --retry-kinds.

    python -m shardsmith.jobs.curate INPUT OUTPUT [options]      (the same as `shardsmith curate`)
"""

from __future__ import annotations

import argparse

from shardsmith.filters.presets import PRESETS
from shardsmith.filters.scores import BUILTIN_HEADS, HEAD_ARCHS
from shardsmith.jobs.entry import add_run_arguments, apply_run_arguments, job_main

# CLI flag -> config key, for the flags that map one to one (the built-in heads' from the registry).
FLAG_KEYS = {
    "mode": "mode", "clip_model": "clip_model", "clip_pretrained": "clip_pretrained",
    **{s.option: s.option for s in BUILTIN_HEADS},
    "preset": "preset", "batch_size": "batch_size", "precision": "precision", "device": "device", "num_actors": "num_actors",
    "actor_cpus": "actor_cpus", "address": "address", "max_image_pixels": "max_image_pixels",
    # --mode urls (see add_fetch_arguments)
    "urls_per_shard": "urls_per_shard", "fetch_threads": "fetch_threads", "fetch_timeout": "fetch_timeout",
    "fetch_deadline": "fetch_deadline", "fetch_retries": "fetch_retries", "fetch_max_bytes": "fetch_max_bytes",
    "fetch_max_redirects": "fetch_max_redirects", "user_agent": "user_agent", "resize_max_side": "resize_max_side",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="input shards or metadata parquet (fsspec URL, glob, {a,b} patterns)")
    p.add_argument("output", help="output folder (fsspec URL)")
    p.add_argument("--config", metavar="FILE", help="YAML config; flags given here override its keys")
    p.add_argument("--mode", choices=["auto", "images", "metadata", "urls"],
                   help="default auto: .tar -> images, .parquet -> metadata; urls: fetch the URLs of LAION "
                        "metadata parquet, then score the images (see the fetch options)")
    p.add_argument("--clip-model", help="open_clip model name, or a path to an open_clip JSON config "
                                        "(default ViT-L-14-quickgelu, which the LAION heads need)")
    p.add_argument("--clip-pretrained", help="pretrained tag (default openai) or a local/fsspec checkpoint path")
    for s in BUILTIN_HEADS:
        p.add_argument(s.flag, metavar="PATH|PREDICTOR", help=f"{s.about}: the {s.name} column")
    p.add_argument("--head", action="append", default=None, metavar="NAME=ARCH:PATH",
                   help="one more score column NAME from a head on the CLIP embedding (repeatable), e.g. "
                        f"pcartoon=linear:s3://models/cartoon.pth, or NAME=PREDICTOR; ARCH: {', '.join(HEAD_ARCHS)}")
    p.add_argument("--predictor-sha256", action="append", default=None, metavar="NAME=HEX",
                   help="pin (or re-pin) predictor NAME to this sha256 (repeatable); `shardsmith predictors list` "
                        "shows the built-in ones and their pins")
    p.add_argument("--no-similarity", action="store_true", help="do not compute image-caption similarity")
    p.add_argument("--preset", choices=sorted(PRESETS), help="rule preset (default laion-aesthetics-5plus)")
    p.add_argument("--rule", action="append", default=None, metavar="RULE",
                   help="extra rule, e.g. 'min_side >= 256' (repeatable; added after the preset's rules)")
    p.add_argument("--embeddings", action="store_true", help="also write embeddings (clip-retrieval layout)")
    p.add_argument("--batch-size", type=int, help="images per model forward (default 64)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the CLIP towers' precision (default auto: fp16 on CUDA, bf16 on CPUs with bf16 units, "
                        "else fp32); heads and similarity always run in fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the image tower")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--num-actors", type=int, help="scoring actors (default: one per GPU, or sized from CPUs)")
    p.add_argument("--actor-cpus", type=float, help="CPUs reserved per scoring actor (default: automatic)")
    p.add_argument("--max-image-pixels", type=int, help="refuse images declaring more pixels (decompression bombs)")
    p.add_argument("--exif-transpose", action="store_true", help="rotate images as EXIF says before scoring "
                                                                 "(default: score as stored, like preprocess(Image.open(f)))")
    p.add_argument("--fast-decode", action="store_true",
                   help="decode JPEGs at a reduced scale (PIL draft) before the model's resize: less decoding "
                        "work, pixels slightly different from open_clip's preprocess (default: exact)")
    p.add_argument("--detect-generated", action="store_true",
                   help="report images carrying shardsmith generate's invisible watermark (a `generated` column)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray, or RAY_ADDRESS)")
    p.add_argument("--overwrite", action="store_true", help="redo everything in OUTPUT (the only way to redo committed shards)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--no-report", action="store_true", help="do not write OUTPUT/report.html at the end "
                                                            "(`shardsmith report OUTPUT` writes it later)")
    add_run_arguments(p)
    add_fetch_arguments(p)


def add_fetch_arguments(p: argparse.ArgumentParser) -> None:
    """Options of --mode urls (and of `shardsmith download`)."""
    g = p.add_argument_group("fetching URLs (--mode urls)")
    g.add_argument("--urls-per-shard", type=int, metavar="N",
                   help="metadata rows per download shard, the unit of fetch/commit/retry (default 10000)")
    g.add_argument("--fetch-threads", type=int, metavar="N", help="concurrent fetches per download task (default 16)")
    g.add_argument("--fetch-timeout", type=float, metavar="S", help="connect and read timeout, seconds (default 10)")
    g.add_argument("--fetch-deadline", type=float, metavar="S",
                   help="whole request incl. body, seconds, per attempt (default 60)")
    g.add_argument("--fetch-retries", type=int, metavar="N",
                   help="extra attempts after a connection error, 5xx or 429, with backoff (default 2)")
    g.add_argument("--fetch-max-bytes", type=int, metavar="N", help="larger bodies are cut: too_large (default 32 MiB)")
    g.add_argument("--fetch-max-redirects", type=int, metavar="N", help="redirects followed (default 5)")
    g.add_argument("--user-agent", help="User-Agent header; name your project and a contact URL "
                                        "(default: shardsmith/VERSION and the project URL)")
    g.add_argument("--resize-max-side", type=int, metavar="N",
                   help="downscale images larger than N px at download time (original size kept in the metadata)")
    g.add_argument("--allow-private-addresses", action="store_true",
                   help="also fetch URLs on loopback, private, link-local and CGNAT addresses (an intranet mirror); "
                        "cloud metadata endpoints stay refused (default: such rows are errors, kind blocked_address)")
    g.add_argument("--retry-failed", action="store_true",
                   help="re-fetch only the rows an earlier run into OUTPUT failed with a retryable kind "
                        "(--retry-kinds), keep the rest, and rewrite those shards")
    g.add_argument("--retry-kinds", metavar="K1,K2",
                   help="error kinds --retry-failed retries (default timeout,connection_error,http_5xx,http_429)")


def config_from_args(args: argparse.Namespace, validate: bool = True):
    """The CurateConfig of these arguments: the --config file's keys, then the flags given."""
    from shardsmith.pipelines.config import (
        CurateConfig,
        config_from_dict,
        load_config_file,
        parse_head_flag,
        pin_predictor_flag,
    )

    cfg = CurateConfig()
    if args.config:
        cfg = config_from_dict(load_config_file(args.config), cfg, source=f"--config {args.config}")
    cfg.input, cfg.output = args.input or cfg.input, args.output or cfg.output
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(cfg, key, value)
    if args.rule:
        cfg.rules = list(cfg.rules) + args.rule
    for text in args.head or []:
        name, head = parse_head_flag(text)
        cfg.heads = {**cfg.heads, name: head}
    for text in getattr(args, "predictor_sha256", None) or []:
        cfg.predictors = pin_predictor_flag(cfg.predictors, text)
    if args.no_similarity:
        cfg.similarity = False
    if args.embeddings:
        cfg.embeddings = True
    if args.exif_transpose:
        cfg.exif_transpose = True
    if args.detect_generated:
        cfg.detect_generated = True
    if args.fast_decode:
        cfg.fast_decode = True
    if args.compile:
        cfg.compile = True
    if args.overwrite:
        cfg.overwrite = True
    if args.quiet:
        cfg.progress = False
    if args.no_report:
        cfg.report = False
    if getattr(args, "allow_private_addresses", False):
        cfg.allow_private_addresses = True
    if getattr(args, "retry_failed", False):
        cfg.retry_failed = True
    if getattr(args, "retry_kinds", None):
        cfg.retry_kinds = [k.strip() for k in args.retry_kinds.split(",") if k.strip()]
    if cfg.preset == "none":
        cfg.preset = None
    apply_run_arguments(args, cfg)
    if validate:
        cfg.validate()
    return cfg


COMMITS_SHARDS = True  # Ctrl-C reports what is committed in OUTPUT


def run(args: argparse.Namespace) -> int:
    from shardsmith.pipelines.flows.curate import run_curate

    run_curate(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.curate", __doc__, add_arguments, run, argv, commits=COMMITS_SHARDS)


if __name__ == "__main__":
    raise SystemExit(main())
