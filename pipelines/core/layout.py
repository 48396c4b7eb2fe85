"""Where a run's files go in OUTPUT: the parts every job has, and a path for each.

    OUTPUT/manifest.json    what the run is (tool, settings fingerprint, models, inputs, versions)
    OUTPUT/stats.json       its totals, rebuilt from the ledger at the end of every run
    OUTPUT/_ledger/S.json   the commit marker of shard S (its stats), written after its files
    OUTPUT/_tmp/            files being written; moved to their final names when complete
    OUTPUT/_lease.json      the lease of the run writing OUTPUT (core/lock.py); never removed by --overwrite
    OUTPUT/report.html, OUTPUT/report/   the report

Each job adds its own parts (curate: ``scores/``, ``curated/`` ...; generate: ``NNNNN.tar`` ...),
which ``--overwrite`` removes with these.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardsmith.pipelines.core import fs as fsutil

LEDGER_DIR = "_ledger"
TMP_DIR = "_tmp"
COMMON_PARTS = (LEDGER_DIR, TMP_DIR, "manifest.json", "stats.json", "report.html", "report")


@dataclass
class OutputLayout:
    root: str

    def path(self, *parts: str) -> str:
        return fsutil.join(self.root, *parts)

    @property
    def ledger_dir(self) -> str:
        return self.path(LEDGER_DIR)

    @property
    def tmp_dir(self) -> str:
        return self.path(TMP_DIR)

    def ledger_entry(self, shard: str) -> str:
        return self.path(LEDGER_DIR, f"{shard}.json")

    @property
    def manifest(self) -> str:
        return self.path("manifest.json")

    @property
    def stats(self) -> str:
        return self.path("stats.json")
