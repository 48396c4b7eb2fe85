"""The shard committer: everything one shard writes, committed as one unit.

Each file is written under ``OUTPUT/_tmp/`` and moved to its final name when complete; ``commit``
then writes the shard's ledger entry, last. A crash before that leaves no ledger entry, so the
shard is redone by the next run (whose files replace what this one moved into place), and a file
under a final name is never incomplete. Every sink (curated, metadata, generated, downloaded)
writes through this class, so that this order holds everywhere.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import IO, Iterator

from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.core.layout import OutputLayout
from shardsmith.pipelines.core.ledger import Ledger
from shardsmith.pipelines.core.manifest import redact


class ShardCommit:
    def __init__(self, out_root: str, shard: str):
        self.layout = OutputLayout(out_root)
        self.shard = shard
        self.outputs: list[str] = []  # relative to OUTPUT, in the order written

    def path(self, rel: str) -> str:
        return self.layout.path(rel)

    @contextmanager
    def open(self, rel: str) -> Iterator[IO]:
        """A binary file object for ``OUTPUT/rel``; the file appears under its name on success.
        Outputs are listed in the order they are opened."""
        self.outputs.append(rel)
        with fsutil.atomic_write(self.layout.path(rel), tmp_dir=self.layout.tmp_dir) as f:
            yield f

    def keep(self, rel: str) -> None:
        """Count ``OUTPUT/rel``, already complete in place (an earlier run's download), as an output."""
        self.outputs.append(rel)

    def parquet(self, rel: str, table, **options) -> None:
        import pyarrow.parquet as pq

        with self.open(rel) as f:
            pq.write_table(table, f, **{"compression": "zstd", **options})

    def commit(self, stats: dict, **fields) -> dict:
        """Write the ledger entry (the shard's stats, its outputs and ``fields``, e.g. ``input``);
        returns it. URLs in it are redacted like the manifest's: the entry feeds ``stats.json`` and
        the report, and an input URL may carry a credential (``user:password@``, a signature)."""
        entry = redact({**stats, "outputs": list(self.outputs), **fields})
        Ledger(self.layout).commit(self.shard, entry)
        return entry
