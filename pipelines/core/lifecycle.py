"""The run lifecycle every job shares:

    take OUTPUT's lease -> start or check the manifest -> todo from the ledger -> dispatch ->
    commit each shard -> finish (stats.json, manifest, summary, report) -> release the lease

A flow plans its shards and describes its run in a :class:`RunSpec`; :func:`run_job` does the
rest and calls the flow's ``execute(todo)`` inside a Ray session for the shards not committed
yet. Each shard commits itself (``ShardCommit``); ``stats.json`` is rebuilt from the ledger at
the end, so it never disagrees with what is committed. A rerun of the same command resumes; other
settings into the same OUTPUT are refused, ``overwrite`` redoes everything. A second run into an
OUTPUT another run holds is refused before it writes anything (``core/lock.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from shardsmith.errors import RunError
from shardsmith.pipelines.core.layout import COMMON_PARTS, OutputLayout
from shardsmith.pipelines.core.ledger import Ledger, aggregate
from shardsmith.pipelines.core.lock import DEFAULT_TTL, Lease
from shardsmith.pipelines.core.manifest import open_run, redact, write_json
from shardsmith.pipelines.core.progress import summary


@dataclass
class RunSpec:
    """What a flow tells the lifecycle about its run."""

    tool: str  # "curate": the manifest's tool is "shardsmith curate"
    output: str
    shards: list[str]  # every shard of the run, in plan order
    fingerprint: dict  # what decides the outputs: a rerun must match it to resume
    config: dict
    models: dict
    inputs: list
    what: str  # the first log line's description, e.g. "3 shard(s) in data/ (images mode)"
    parts: tuple[str, ...] = ()  # the job's own outputs, removed with the common ones by ``overwrite``
    overwrite: bool = False
    address: str | None = None
    notes: list[str] = field(default_factory=list)  # logged after the first line
    # committed shards to do again (``--retry-failed``): (committed entries, layout) -> names
    redo: Callable[[dict, OutputLayout], list[str]] | None = None
    redo_what: str = ""  # e.g. "failures to retry: timeout, http_5xx"
    # more stats at the end: (stats so far, layout, log) -> keys to add
    extra_stats: Callable[[dict, OutputLayout, Callable], dict] | None = None
    # what the manifest's models gain at the end, from the stats (e.g. the precision actually used)
    models_used: Callable[[dict], dict] | None = None
    summary_title: str = ""
    summary_notes: list[str] = field(default_factory=list)
    after: Callable[[str, Callable], None] | None = None  # e.g. the report: (output, log)
    # False: an inner stage of a multi-stage job (dedup), whose units share the job's one ledger
    # under stage-prefixed names: its stats are returned, but stats.json, the summary and the
    # report are the last stage's
    final: bool = True
    parent: dict | None = None  # the run this one derives from (recurate: RUN's path, fingerprint), in the manifest
    lock_ttl: float = DEFAULT_TTL  # seconds OUTPUT's lease lives without renewal (core/lock.py)
    break_lock: bool = False  # take OUTPUT's lease even from a run that still renews it


def run_job(spec: RunSpec, execute: Callable[[list[str]], None], log=print) -> dict:
    """Run ``spec``: ``execute(todo)`` runs the dataflow of the shards to do (inside a Ray session);
    returns the run's stats (also written to stats.json). OUTPUT's lease is held throughout: a
    run that loses it stops with a ``RunError``."""
    lease = Lease(spec.output, f"shardsmith {spec.tool}", spec.lock_ttl, spec.break_lock, log)
    lease.acquire()  # before anything is written
    lease.start()
    try:
        return _run(spec, execute, log)
    except KeyboardInterrupt:
        if lease.lost:  # the renewal thread stopped the run
            raise RunError(lease.lost) from None
        raise
    finally:
        lease.release()


def _run(spec: RunSpec, execute: Callable[[list[str]], None], log) -> dict:
    from shardsmith.pipelines.core.resources import ray_session

    raw_log = log

    def log(line, *a, **kw):  # URLs in a line may carry credentials: redacted like the manifest's
        return raw_log(redact(line) if isinstance(line, str) else line, *a, **kw)

    layout = OutputLayout(spec.output)
    manifest = open_run(layout, f"shardsmith {spec.tool}", spec.fingerprint, spec.config, spec.models, spec.inputs,
                        spec.overwrite, COMMON_PARTS + tuple(spec.parts), parent=spec.parent)
    ledger = Ledger(layout)
    ledger.clean_tmp()
    committed = ledger.committed()
    redo = spec.redo(committed, layout) if spec.redo else []
    todo = [n for n in spec.shards if n not in committed or n in redo]
    log(f"shardsmith {spec.tool}: {spec.what}; {len(spec.shards) - len(todo)} already committed, {len(todo)} to do"
        + (f" ({len(redo)} committed with {spec.redo_what})" if redo else ""))
    for line in spec.notes:
        log(line)
    t0 = time.time()
    if todo:
        with ray_session(spec.address):
            execute(todo)
    entries = ledger.committed()
    missing = [n for n in spec.shards if n not in entries]
    if missing:
        raise RunError(f"{len(missing)} shard(s) were not committed: {', '.join(missing[:10])}; rerun to resume")
    stats = aggregate({n: entries[n] for n in spec.shards})
    if not spec.final:
        return stats
    if spec.extra_stats:
        stats.update(spec.extra_stats(stats, layout, log))
    stats["seconds_this_run"] = round(time.time() - t0, 3)
    write_json(layout.stats, stats, tmp_dir=layout.tmp_dir)
    if spec.models_used:
        manifest["models"] = {**manifest.get("models", {}), **spec.models_used(stats)}
    manifest["finished_at"] = time.time()
    write_json(layout.manifest, manifest, tmp_dir=layout.tmp_dir)
    ledger.clean_tmp()
    log(summary(stats, spec.summary_title, spec.summary_notes))
    if spec.after:
        spec.after(spec.output, log)
    return stats
