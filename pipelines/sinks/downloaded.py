"""The download sink (``shardsmith download``): a downloaded shard committed in the ledger.

The download stage has written ``OUTPUT/S.tar`` and ``OUTPUT/S.parquet`` (img2dataset's layout,
the parquet last: its completion marker); the shard is committed with curate's counters: success
-> kept, skipped -> dropped by the rule that skipped it, failed -> error by kind.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from shardsmith.filters.rules import RuleSet
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.core.commit import ShardCommit
from shardsmith.pipelines.core.ledger import shard_stats
from shardsmith.pipelines.formats.inputs import UrlShard
from shardsmith.pipelines.stages.download import DownloadOptions, download_paths, download_shard

OUTCOME = {"success": "kept", "skipped": "dropped", "failed_to_download": "error"}


def download_task(shard: UrlShard, rules: RuleSet, options: DownloadOptions, per_shard: int, out_root: str) -> dict:
    """Ray task: download one shard into OUTPUT (or reuse its complete download), commit it."""
    commit = ShardCommit(out_root, shard.name)
    summary = download_shard(shard, out_root, commit.layout.tmp_dir, rules, options, per_shard)
    tar_url, index_url = download_paths(out_root, shard.name)
    with fsutil.open_file(index_url) as f:
        index = pq.read_table(f, columns=["status", "reason"], use_threads=False)
    stats = shard_stats([OUTCOME[s] for s in index.column("status").to_pylist()], index.column("reason").to_pylist())
    commit.keep(f"{shard.name}.tar")
    commit.keep(f"{shard.name}.parquet")
    return commit.commit(stats, input=shard.url, rows=[shard.start, shard.stop], download=summary)
