"""What every job entry point shares: its ``main()`` (an argparse parser named ``python -m
shardsmith.jobs.NAME`` around the module's ``add_arguments``/``run``), and the one mapping of
what can go wrong to exit codes and messages:

- a ``ShardsmithError`` (configuration, input, output folder): one line
  ``shardsmith JOB: error: MESSAGE`` on stderr, exit code 2;
- Ctrl-C: exit code 130, saying what is committed in OUTPUT and how to resume;
- the Ray cluster losing work in progress (a node, an actor or an object lost, and Ray's own
  retries spent): one line saying so and what is committed, exit code 1;
- anything else is a bug or an outage: its traceback, exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from shardsmith.errors import EXIT_FAILED, EXIT_INTERRUPTED, ShardsmithError, one_line
from shardsmith.pipelines.core.progress import close_live_bars

# Ray's errors for work lost with a node, a worker or an object (matched by name: no Ray import here).
RAY_LOSSES = {"ObjectLostError", "ObjectFetchTimedOutError", "OwnerDiedError", "ObjectReconstructionFailedError",
              "ObjectReconstructionFailedMaxAttemptsExceededError", "ObjectReconstructionFailedLineageEvictedError",
              "ReferenceCountingAssertionError", "NodeDiedError", "ActorDiedError", "ActorUnavailableError",
              "WorkerCrashedError", "LocalRayletDiedError", "RaySystemError", "NodeAffinitySchedulingError"}


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
        close_live_bars()
        from shardsmith.pipelines.core.manifest import redact  # a URL in the message may carry a credential

        print(f"shardsmith {tool}: error: {redact(one_line(e))}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        found = user_error(e)  # raised in a Ray task or a dataset stage, and wrapped on its way here
        if found is not None:
            print(f"shardsmith {tool}: error: {one_line(found)}", file=sys.stderr)
            return found.exit_code
        lost = cluster_loss(e)
        if lost is None:
            raise
        output = getattr(args, "output", None) if commits else None
        note = f" {committed_note(output)}" if output else ""
        first = (str(lost).strip().splitlines() or [""])[0][:300]
        print(f"shardsmith {tool}: error: the Ray cluster lost work in progress ({type(lost).__name__}: {first})."
              f"{note} Rerun the same command to resume: committed shards are skipped.", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        close_live_bars()
        output = getattr(args, "output", None) if commits else None
        note = f" {committed_note(output)} Rerun the same command to resume: committed shards are skipped, the " \
               "others are redone." if output else ""
        print(f"\nshardsmith {tool}: interrupted.{note}", file=sys.stderr)
        return EXIT_INTERRUPTED


def user_error(e: BaseException) -> ShardsmithError | None:
    """The ``ShardsmithError`` an exception was raised from (a Ray task's ``cause``, or ``raise ...
    from``), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ShardsmithError):
            return e
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else e.__cause__
    return None


def cluster_loss(e: BaseException) -> BaseException | None:
    """The Ray error for lost work (a node, worker, actor or object) an exception comes from."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(c.__name__ in RAY_LOSSES for c in type(e).__mro__):
            return e
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options every job that commits shards to an OUTPUT has (``apply_run_arguments``)."""
    g = p.add_argument_group("one run per OUTPUT, no silent hang")
    g.add_argument("--break-lock", action="store_true",
                   help="take OUTPUT's lease even though another run still renews it (only when you know that run "
                        "is dead; a killed run's lease is taken over by itself once it expires)")
    g.add_argument("--lock-ttl", type=float, metavar="S",
                   help="seconds OUTPUT's lease lives without renewal; renewed every S/3 (default 60)")
    g.add_argument("--stall-timeout", type=float, metavar="S",
                   help="stop the run, naming the stage and shard, after S seconds without any progress (a hung "
                        "or repeatedly dying actor); committed shards stay, a rerun resumes (default 1800)")


def apply_run_arguments(args: argparse.Namespace, cfg) -> None:
    if getattr(args, "break_lock", False):
        cfg.break_lock = True
    for key in ("lock_ttl", "stall_timeout"):
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))


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
