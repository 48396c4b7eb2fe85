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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the OUTPUT folder of a finished run (fsspec URL)")
    p.add_argument("--per-grid", type=int, default=16, metavar="N",
                   help="samples per grid (default 16; generated images: twice that)")


def run(args: argparse.Namespace) -> int:
    from shardsmith.pipelines.report import ReportError, build_report

    if args.per_grid < 1:
        raise ReportError("--per-grid must be >= 1")
    try:
        url = build_report(args.output, per_grid=args.per_grid)
    except OSError as e:  # e.g. OUTPUT not writable
        raise ReportError(f"{type(e).__name__}: {e}") from e
    print(f"report: {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.report", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
