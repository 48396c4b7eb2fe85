"""``shardsmith report OUTPUT``: write OUTPUT/report.html, one self-contained page showing what a run
did to the data.

For a curate run: the funnel (rows read -> kept, dropped by rule, errors by kind), the per-shard
table, a histogram per score with the rules' thresholds on it, aesthetic vs watermark, and sample
grids (best, worst, most watermarked, borderline around each threshold, errors) with key, caption
and scores on every tile. For generate/augment outputs: the generated images with prompt, seed and
parameters. Then config, models, versions and timings. Plots are also written to OUTPUT/report/
as PNG. Thumbnails and plots are embedded, so the page works offline and when copied alone.
`shardsmith curate` writes the report at its end unless --no-report.

    python -m shardsmith.jobs.report OUTPUT      (the same as `shardsmith report`)
"""

from __future__ import annotations

import argparse

from shardsmith.jobs.entry import job_main


FLAGS = {"output": "output", "per_grid": "per_grid"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the OUTPUT folder of a finished run (fsspec URL)")
    p.add_argument("--config", metavar="FILE", help="YAML config (keys: per_grid); flags given here win")
    p.add_argument("--per-grid", type=int, metavar="N",
                   help="samples per grid (default 16; generated images: twice that)")


def config_from_args(args: argparse.Namespace, validate: bool = True):
    from shardsmith.pipelines.config.base import config_from_args as from_args
    from shardsmith.pipelines.config.report import ReportConfig

    cfg = from_args(ReportConfig, args, FLAGS)
    if validate:
        cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    from shardsmith.pipelines.report import ReportError, build_report

    cfg = config_from_args(args)
    try:
        url = build_report(cfg.output, per_grid=cfg.per_grid)
    except OSError as e:  # e.g. OUTPUT not writable
        raise ReportError(f"{type(e).__name__}: {e}") from e
    print(f"report: {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.report", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
