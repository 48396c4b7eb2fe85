"""The problems a user can fix, and the exit codes every job uses.

Every error raised for a bad configuration, a bad input, or an output folder that cannot take the
run derives from :class:`ShardsmithError`: the CLI prints it as one line (``shardsmith JOB: error:
MESSAGE``) and exits with code 2; the Python API raises it as it is. Anything else is a bug or an
outage and keeps its traceback. This module imports nothing heavy: every layer may use it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected failure (a bug, a cluster outage): the traceback is printed
EXIT_USAGE = 2  # a configuration or input error: one line
EXIT_INTERRUPTED = 130  # Ctrl-C: committed shards stay committed, a rerun resumes


class ShardsmithError(Exception):
    """A problem the user can fix; the message says which file, column, key or flag."""

    exit_code = EXIT_USAGE


class ConfigError(ShardsmithError, ValueError):
    """A configuration problem, found before any work starts; the message names the key."""


class InputError(ShardsmithError, ValueError):
    """An input problem found while planning; the message names the file (and column)."""


class RunError(ShardsmithError, RuntimeError):
    """The output folder cannot take this run (other settings, not writable, shards missing)."""


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line. A Ray task's error arrives wrapped with the remote
    traceback (``RayTaskError``); its cause is what the user needs."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    text = " ".join(str(e).split())
    return text or type(e).__name__


def version() -> str:
    try:
        from importlib.metadata import version as _v

        return _v("shardsmith")
    except Exception:
        return "0+unknown"
