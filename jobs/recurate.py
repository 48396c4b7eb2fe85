"""``shardsmith recurate RUN OUTPUT``: a new selection from a finished curate run, without re-embedding.

RUN is the OUTPUT of a curate run (images or urls mode). Its stored scores are decided again with
new rules (--preset, --rule; with neither, RUN's own rules), and new score columns are computed
from its stored embeddings (--head NAME=ARCH:PATH; RUN must have been curated with --embeddings).
No CLIP model is loaded and no image decoded: it runs with the CLIP weights absent. Error rows of
RUN stay errors with their message. OUTPUT is a full run output: scores/ (every row, the new
columns and decisions), curated/NNNNN.tar + .parquet (the kept samples copied from RUN's input
shards, bytes untouched), stats.json, report.html, and a manifest naming RUN (path, fingerprint)
as its parent. A rerun resumes; --overwrite redoes.

    python -m shardsmith.jobs.recurate RUN OUTPUT [options]      (the same as `shardsmith recurate`)
"""

from __future__ import annotations

import argparse

from shardsmith.filters.presets import PRESETS
from shardsmith.filters.scores import HEAD_ARCHS
from shardsmith.jobs.entry import job_main

FLAGS = {"run": "run", "output": "output", "preset": "preset", "address": "address",
         "overwrite": "overwrite", "quiet": ("progress", lambda v: not v), "no_report": ("report", lambda v: not v)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="the OUTPUT folder of a finished curate run (fsspec URL)")
    p.add_argument("output", help="output folder for the new selection (fsspec URL)")
    p.add_argument("--config", metavar="FILE", help="YAML config (keys: preset, rules, heads, ...); flags win")
    p.add_argument("--preset", choices=sorted(PRESETS), help="rule preset (default: RUN's rules, when no --rule either)")
    p.add_argument("--rule", action="append", default=None, metavar="RULE",
                   help="rule, repeatable, added after the preset's, e.g. 'aesthetic >= 6'")
    p.add_argument("--head", action="append", default=None, metavar="NAME=ARCH:PATH",
                   help="a score column NAME computed from RUN's stored embeddings (repeatable); ARCH: "
                        f"{', '.join(HEAD_ARCHS)}")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray, or RAY_ADDRESS)")
    p.add_argument("--overwrite", action="store_true", default=None, help="redo everything in OUTPUT")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress lines")
    p.add_argument("--no-report", action="store_true", default=None, help="do not write OUTPUT/report.html")


def config_from_args(args: argparse.Namespace, validate: bool = True):
    from shardsmith.pipelines.config import parse_head_flag
    from shardsmith.pipelines.config.base import config_from_args as from_args
    from shardsmith.pipelines.config.recurate import RecurateConfig

    cfg = from_args(RecurateConfig, args, FLAGS)
    if args.rule:
        cfg.rules = list(cfg.rules) + args.rule
    for text in args.head or []:
        name, head = parse_head_flag(text)
        cfg.heads = {**cfg.heads, name: head}
    if validate:
        cfg.validate()
    return cfg


COMMITS_SHARDS = True


def run(args: argparse.Namespace) -> int:
    from shardsmith.pipelines.flows.recurate import run_recurate

    run_recurate(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.recurate", __doc__, add_arguments, run, argv, commits=COMMITS_SHARDS)


if __name__ == "__main__":
    raise SystemExit(main())
