"""``shardsmith config show JOB [--config FILE] [JOB's flags]``: the effective config of a job.

Prints, as YAML, the config JOB would run with: its defaults, then the keys of ``--config FILE``,
then the flags given (the same precedence as the job itself), after the same checks (unknown keys
and wrong types are refused; the job's own range and combination checks run when its positional
arguments are given). The output is a valid ``--config`` file for that job.

    shardsmith config show curate
    shardsmith config show curate --config curate.yaml --batch-size 32
    shardsmith config show generate --config gen.yaml PROMPTS OUTPUT
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print JOB's effective config (defaults <- --config FILE <- flags) as YAML")
    show.add_argument("job", metavar="JOB",
                      help="a job that takes --config: curate, download, generate, augment, recurate, report, ...")
    show.add_argument("args", nargs=argparse.REMAINDER, metavar="...", help="JOB's own arguments (--config FILE, flags)")


def job_config(job: str, argv: list[str]):
    """(config, validated) of ``job`` for these arguments, as the job itself builds it."""
    from shardsmith.errors import ConfigError
    from shardsmith.jobs.cli import COMMANDS, load

    mod = load(job) if job in COMMANDS else None
    if mod is None or not hasattr(mod, "config_from_args"):
        jobs = [n for n in COMMANDS if n != "config" and hasattr(load(n), "config_from_args")]
        raise ConfigError(f"{job!r} is not a job with a config; jobs: {', '.join(jobs)}")
    parser = argparse.ArgumentParser(prog=f"shardsmith config show {job}")
    mod.add_arguments(parser)
    required = [a for a in parser._actions if not a.option_strings and a.nargs is None]
    for a in required:  # the config can be shown without them; the job's own checks need them
        a.nargs, a.required = "?", False
    args = parser.parse_args(argv)
    complete = all(getattr(args, a.dest) is not None for a in required)
    return mod.config_from_args(args, validate=complete), complete


def run(args: argparse.Namespace) -> int:
    import yaml

    from shardsmith.pipelines.config.base import to_dict

    cfg, validated = job_config(args.job, args.args)
    print(f"# shardsmith {args.job}: effective config (defaults <- --config FILE <- flags)"
          + ("" if validated else f"; give {args.job}'s positional arguments to run its own checks too"))
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    from shardsmith.jobs.entry import job_main

    return job_main("shardsmith.jobs.config", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
