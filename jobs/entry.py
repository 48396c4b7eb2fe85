"""What every job entry point shares: its ``main()`` (an argparse parser named ``python -m
jobs.NAME`` around the module's ``add_arguments``/``run``), and for the jobs that commit shards to
an OUTPUT (curate, download, generate, augment) the exit codes and messages of a failed or
interrupted run."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def job_main(module: str, doc: str | None, add_arguments: Callable, run: Callable[[argparse.Namespace], int],
             argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def committed_note(output: str) -> str:
    """What an interrupted run leaves: the committed shards, from the ledger."""
    from shardsmith.pipelines.core.ledger import Ledger, OutputLayout

    try:
        done = sorted(Ledger(OutputLayout(output)).committed())
    except Exception:
        return "Could not read the ledger."
    if not done:
        return "No shard was committed yet."
    shown = ", ".join(done[:10]) + (" ..." if len(done) > 10 else "")
    return f"{len(done)} shard(s) are committed in {output} ({shown})."


def run_resumable(tool: str, output: str, work: Callable[[], object], errors: tuple[type[Exception], ...]) -> int:
    """Run ``work``, a job committing shards to ``output``: 0 when done; 2 with a one-line message
    on a configuration or input error (``errors``); 130 on Ctrl-C, saying what is committed and
    how to resume."""
    try:
        work()
    except errors as e:
        print(f"shardsmith {tool}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nshardsmith {tool}: interrupted. {committed_note(output)} Rerun the same command to resume: "
              "committed shards are skipped, the others are redone.", file=sys.stderr)
        return 130
    return 0
