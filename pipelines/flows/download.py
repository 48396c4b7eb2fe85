"""download: LAION metadata -> img2dataset-layout shards, every row with its fate.

    metadata parquet -> URL shards (``urls_per_shard`` rows each) -> one Ray task per shard, a
    bounded window in flight (stages/download.py: metadata rules, fetch, tar + parquet) -> ledger
    commit (sinks/downloaded.py)

The download step of ``curate --mode urls`` alone; ``--retry-failed`` re-fetches only the rows
that failed with a retryable kind. Its rules must be decidable from the metadata.
"""

from __future__ import annotations

from shardsmith.errors import ConfigError
from shardsmith.pipelines.config import CurateConfig
from shardsmith.pipelines.core.ledger import Ledger
from shardsmith.pipelines.core.lifecycle import RunSpec, run_job


def retry_failed(cfg: CurateConfig, names: list[str]):
    """``RunSpec.redo`` for ``--retry-failed``: the committed shards whose rows failed with one of
    ``retry_kinds`` (their ledger entries' ``errors_by_kind``) are uncommitted, so that they are
    redone -- and stay to do if this run is interrupted."""
    if not cfg.retry_failed:
        return None

    def redo(committed: dict, layout) -> list[str]:
        again = [n for n in names if n in committed
                 and any(committed[n].get("errors_by_kind", {}).get(k) for k in cfg.retry_kinds)]
        Ledger(layout).uncommit(again)
        return again

    return redo


def run_download(cfg: CurateConfig, log=print) -> dict:
    """``shardsmith download``: the download step alone, into OUTPUT/NNNNN.tar + .parquet."""
    import ray

    from shardsmith.pipelines.core.dispatch import Dispatcher, progress_on_commit
    from shardsmith.pipelines.core.progress import Progress
    from shardsmith.pipelines.formats.inputs import UrlShard, plan_url_shards
    from shardsmith.pipelines.sinks.downloaded import download_task
    from shardsmith.pipelines.stages.download import DownloadOptions, read_metadata_rows

    cfg.mode = "urls"
    cfg.validate()
    rules = cfg.ruleset()
    shards = plan_url_shards(cfg.input, cfg.urls_per_shard)
    for s in {s.url: s for s in shards}.values():
        _, available = read_metadata_rows(UrlShard(s.name, s.url, 0, 0))
        missing = [r.name for r in rules.rules if not r.needs() <= available]
        if missing:
            raise ConfigError(f"rule '{missing[0]}' reads a field that {s.url} does not have; download applies "
                              "metadata rules only (score rules belong to `shardsmith curate --mode urls`)")
    by_name = {s.name: s for s in shards}

    def execute(todo: list[str]) -> None:
        options = DownloadOptions.from_config(cfg)
        task = ray.remote(num_cpus=0.25, max_retries=2)(download_task)
        progress = Progress("download", sum(by_name[n].stop - by_name[n].start for n in todo), len(todo),
                            enabled=cfg.progress)
        dispatcher = Dispatcher(window=max(4, 4 * int(ray.cluster_resources().get("CPU", 1))),
                                on_done=progress_on_commit(progress), stall_timeout=cfg.stall_timeout, stage="download")
        for name in todo:
            dispatcher.submit(task.remote(by_name[name], rules, options, cfg.urls_per_shard, cfg.output), tag=0,
                              name=name)
        dispatcher.drain()
        progress.close()

    names = list(by_name)
    run = RunSpec(
        tool="download", output=cfg.output, shards=names, config=cfg.to_dict(), models={},
        fingerprint={"rules": cfg.all_rules(), "urls_per_shard": cfg.urls_per_shard,
                     "resize_max_side": cfg.resize_max_side, "opt_out_directives": cfg.opt_out_directives},
        inputs=[s.to_dict() for s in shards], what=f"{len(shards)} shard(s) of URLs in {cfg.input}",
        parts=tuple(f"{n}.{ext}" for n in names for ext in ("tar", "parquet")), overwrite=cfg.overwrite,
        address=cfg.address, redo=retry_failed(cfg, names), redo_what=f"failures to retry: {', '.join(cfg.retry_kinds)}",
        extra_stats=lambda stats, layout, log: {"mode": "download", "rules": rules.names},
        summary_title=f"\ndownload summary ({len(shards)} shards; kept = fetched)",
        summary_notes=[f"\noutputs in {cfg.output}: NNNNN.tar + NNNNN.parquet (img2dataset layout), stats.json"],
        lock_ttl=cfg.lock_ttl, break_lock=cfg.break_lock)
    return run_job(run, execute, log)
