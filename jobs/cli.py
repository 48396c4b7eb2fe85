"""The ``shardsmith`` command: one subcommand per job; each is also ``python -m shardsmith.jobs.<name>``.

Only the subcommand that runs is imported (``shardsmith --help`` imports no job, torch or Ray), and
every job's errors map to exit codes in one place (``jobs/entry.py``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module[:attribute] that has add_arguments/run, one line of help)
COMMANDS = {
    "curate": ("shardsmith.jobs.curate", "score and filter a LAION-style dataset (webdataset shards or metadata parquet)"),
    "download": ("shardsmith.jobs.download",
                 "fetch LAION metadata's URLs into img2dataset-layout shards (curate --mode urls scores too)"),
    "dedup": ("shardsmith.jobs.dedup",
              "exact, perceptual (pHash) and semantic (CLIP) near-duplicates across curate outputs; deduplicated set"),
    "recurate": ("shardsmith.jobs.recurate", "a new selection from a finished run's scores and embeddings: new rules, "
                 "new heads, no image decoded"),
    "report": ("shardsmith.jobs.report", "write OUTPUT/report.html: funnel, score histograms with thresholds, sample grids"),
    "inspect": ("shardsmith.jobs.inspect", "print a shard's samples and scores as a table; write one sample's image out"),
    "sample-data": ("shardsmith.jobs.sample_data", "write a deterministic LAION-style sample dataset"),
    "tiny-models": ("shardsmith.jobs.tiny_models",
                    "build tiny random models (open_clip config + weights, heads) for offline runs"),
    "generate": ("shardsmith.jobs.generate",
                 "bulk text-to-image with Stable Diffusion from a prompt table, reproducible per seed"),
    "augment": ("shardsmith.jobs.augment",
                "img2img variants of a webdataset's images (SDEdit), for training-set preparation"),
    "config": ("shardsmith.jobs.config", "show a job's effective config (defaults <- --config FILE <- flags) as YAML"),
    "regenerate": ("shardsmith.jobs.regenerate",
                   "make a generated image again from its KEY.json; say whether it is bit-identical"),
    "demo": ("shardsmith.jobs.demo", "sample data + tiny models + curate, end to end, into ./demo-output"),
    "submit": ("shardsmith.jobs.submit",
               "run a job on a Ray cluster through Ray's job API; stream its logs, exit with its status"),
    "jobs": ("shardsmith.jobs.submit:jobs_command", "list, inspect, follow or stop jobs on a Ray cluster"),
    "predictors": ("shardsmith.jobs.predictors",
                   "list, fetch and verify named predictors (LAION's heads by name: laion-aesthetic-v2, ...)"),
    "fit-head": ("shardsmith.jobs.fit_head",
                 "fit a CLIP-based head (probability/mlp) on labelled embeddings, with k-fold held-out metrics"),
    "make-watermark-data": ("shardsmith.jobs.make_watermark_data",
                            "synthetic watermarked positives + clean negatives as labelled shards, for fit-head"),
    "convert-predictor": ("shardsmith.jobs.convert_predictor",
                          "LAION's Keras NSFW detector -> a laion-nsfw safetensors head (no TensorFlow)"),
}


def load(name: str):
    """The object of subcommand ``name`` that has ``add_arguments`` and ``run`` (a job module)."""
    target, _ = COMMANDS[name]
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def build_parser(only: str | None = None, load_all: bool = True) -> argparse.ArgumentParser:
    """The parser; a subcommand's own arguments are added (and its module imported) only for
    ``only``, or for every subcommand when ``load_all``."""
    p = argparse.ArgumentParser(
        prog="shardsmith",
        description="Curate LAION-style image-text datasets on Ray: embed once with CLIP, score, filter, write.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        if name == only or (only is None and load_all):
            mod = load(name)
            sp = sub.add_parser(name, help=help_text, description=mod.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
            mod.add_arguments(sp)
            sp.set_defaults(_run=mod.run, _commits=getattr(mod, "COMMITS_SHARDS", False))
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    from shardsmith.jobs.entry import invoke

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else None, load_all=False)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return invoke(args.command, args._run, args, args._commits)


if __name__ == "__main__":
    sys.exit(main())
