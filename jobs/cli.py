"""The ``shardsmith`` command: one subcommand per job; each is also ``python -m shardsmith.jobs.<name>``."""

from __future__ import annotations

import argparse
import os
import sys

from shardsmith.jobs import augment, curate, demo, generate, sample_data, submit, tiny_models
from shardsmith.jobs import inspect, report
from shardsmith.jobs import download

COMMANDS = {
    "curate": (curate, "score and filter a LAION-style dataset (webdataset shards or metadata parquet)"),
    "download": (download, "fetch LAION metadata's URLs into img2dataset-layout shards (curate --mode urls scores too)"),
    "report": (report, "write OUTPUT/report.html: funnel, score histograms with thresholds, sample grids"),
    "inspect": (inspect, "print a shard's samples and scores as a table; write one sample's image out"),
    "sample-data": (sample_data, "write a deterministic LAION-style sample dataset"),
    "tiny-models": (tiny_models, "build tiny random models (open_clip config + weights, heads) for offline runs"),
    "generate": (generate, "bulk text-to-image with Stable Diffusion from a prompt table, reproducible per seed"),
    "augment": (augment, "img2img variants of a webdataset's images (SDEdit), for training-set preparation"),
    "demo": (demo, "sample data + tiny models + curate, end to end, into ./demo-output"),
    "submit": (submit, "run a job on a Ray cluster through Ray's job API; stream its logs, exit with its status"),
    "jobs": (submit.jobs_command, "list, inspect, follow or stop jobs on a Ray cluster"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardsmith",
        description="Curate LAION-style image-text datasets on Ray: embed once with CLIP, score, filter, write.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
