"""What every job entry point shares: its ``main()`` (an argparse parser named ``python -m
shardsmith.jobs.NAME`` around the module's ``add_arguments``/``run``), and the one mapping of
what can go wrong to exit codes and messages:

- a ``ShardsmithError`` (configuration, input, output folder): one line
  ``shardsmith JOB: error: MESSAGE`` on stderr, exit code 2;
- Ctrl-C: exit code 130, saying what is committed in OUTPUT and how to resume;
- anything else is a bug or an outage: its traceback, exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from shardsmith.errors import EXIT_INTERRUPTED, ShardsmithError, one_line


def job_main(module: str, doc: str | None, add_arguments: Callable, run: Callable[[argparse.Namespace], int],
             argv: list[str] | None = None, commits: bool = False) -> int:
    """``commits``: the job commits shards to ``args.output`` (what Ctrl-C reports)."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return invoke(module.rsplit(".", 1)[-1].replace("_", "-"), run, p.parse_args(argv), commits)


def invoke(tool: str, run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace,
           commits: bool = False) -> int:
    """``run(args)``, with its errors mapped to exit codes (see the module docstring)."""
    try:
        return run(args) or 0
    except ShardsmithError as e:
        from shardsmith.pipelines.core.manifest import redact  # a URL in the message may carry a credential

        print(f"shardsmith {tool}: error: {redact(one_line(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        output = getattr(args, "output", None) if commits else None
        note = f" {committed_note(output)} Rerun the same command to resume: committed shards are skipped, the " \
               "others are redone." if output else ""
        print(f"\nshardsmith {tool}: interrupted.{note}", file=sys.stderr)
        return EXIT_INTERRUPTED


def committed_note(output: str) -> str:
    """What an interrupted run leaves: the committed shards, from the ledger."""
    from shardsmith.pipelines.core.layout import OutputLayout
    from shardsmith.pipelines.core.ledger import Ledger

    try:
        done = sorted(Ledger(OutputLayout(output)).committed())
    except Exception:
        return "Could not read the ledger."
    if not done:
        return "No shard was committed yet."
    shown = ", ".join(done[:10]) + (" ..." if len(done) > 10 else "")
    return f"{len(done)} shard(s) are committed in {output} ({shown})."
