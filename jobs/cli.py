"""The ``shardsmith`` command: one subcommand per job; each is also ``python -m jobs.<name>``."""

from __future__ import annotations

import argparse
import os
import sys

from jobs import curate, demo, sample_data, tiny_models

COMMANDS = {
    "curate": (curate, "score and filter a LAION-style dataset (webdataset shards or metadata parquet)"),
    "sample-data": (sample_data, "write a deterministic LAION-style sample dataset"),
    "tiny-models": (tiny_models, "build tiny random models (open_clip config + weights, heads) for offline runs"),
    "demo": (demo, "sample data + tiny models + curate, end to end, into ./demo-output"),
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
