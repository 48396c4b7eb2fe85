"""curate's images dataflow on Ray Data (images mode, and urls mode after the download):

    shards -> read + decode (CPU tasks: tar stream -> samples -> model pixels, batch by batch;
              urls mode: download, then read the downloaded tar, then decode)
           -> score (actor pool: one CLIP image forward + heads + caption similarity)
           -> driver: gather a shard's rows -> write (CPU task: rules, scores parquet,
              curated tar + parquet, embeddings, ledger commit; sinks/curated.py)
"""

from __future__ import annotations

import pyarrow as pa

from shardsmith.pipelines.config import CurateConfig
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.formats.inputs import InputShard


def build_dataset(shards: list[InputShard], cfg: CurateConfig, spec, pixel_transform, image_size: tuple[int, int],
                  plan, read_fn=None, read_kwargs: dict | None = None):
    """The read -> decode -> score chain. ``read_fn`` replaces the tar reader (urls mode: download,
    then read the downloaded tar; there decode stays a stage of its own)."""
    import ray
    from ray.data import ActorPoolStrategy

    from shardsmith.pipelines.core.resources import TASK_STAGE_ARGS
    from shardsmith.pipelines.stages.decode import decode_batch
    from shardsmith.pipelines.stages.read import (
        block_size,
        pixel_block_bytes,
        read_batch_rows,
        read_decode_rows,
        read_tasks,
    )
    from shardsmith.pipelines.stages.score import ScoreStage

    items = [{"shard": s.name, "url": s.url} for s in shards]
    decode_kwargs = {"pixel_transform": pixel_transform, "image_size": image_size,
                     "max_pixels": cfg.max_image_pixels, "exif_transpose": cfg.exif_transpose,
                     "detect_generated": cfg.detect_generated, "fast": cfg.fast_decode}
    pixel_inputs = spec.pixel_inputs() if spec is not None else {}
    if pixel_inputs:  # a model that reads pixels of its own (LAION's watermark classifier)
        decode_kwargs["pixel_inputs"] = pixel_inputs
    if read_fn is None:
        # Small shards are read in groups (one task per group: one input block each), their rows
        # packed into batches of a multiple of the forward size (read_shard_rows), decoded in the
        # same task and passed on one batch per block, so every forward is full but the last one
        # of each group.
        rows = read_batch_rows(cfg.batch_size)
        with block_size(pixel_block_bytes(rows, image_size, [pi.size for pi in pixel_inputs.values()])):
            ds = ray.data.from_items(items, override_num_blocks=read_tasks(shards, plan.num_actors))
        ds = ds.map_batches(read_decode_rows, fn_kwargs={"rows_per_batch": rows, "decode_kwargs": decode_kwargs},
                            batch_size=None, num_cpus=plan.decode_cpus, zero_copy_batch=True, **TASK_STAGE_ARGS)
    else:
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds = ds.map_batches(read_fn, fn_kwargs=read_kwargs, batch_size=1, num_cpus=plan.read_cpus,
                            zero_copy_batch=True, **TASK_STAGE_ARGS)
        ds = ds.map_batches(decode_batch, fn_kwargs=decode_kwargs, batch_size=cfg.decode_batch_size,
                            num_cpus=plan.decode_cpus, **TASK_STAGE_ARGS)
    return ds.map_batches(
        ScoreStage,
        fn_constructor_args=(spec, plan.device, plan.torch_threads, cfg.embeddings, cfg.batch_size),
        # Start the whole pool at once: Ray Data spreads the actors over the nodes, and a pool that
        # starts at one actor only grows under backpressure, which a small run never builds.
        compute=ActorPoolStrategy(min_size=1, max_size=plan.num_actors, initial_size=plan.num_actors),
        # On CPU, one read batch per call (whole blocks: a forward batch of samples plus the rows
        # that need none), so that no forward is padded but the last; Ray Data refuses whole
        # blocks for GPU stages, where a padded forward also costs far less.
        batch_size=None if read_fn is None and plan.actor_gpus == 0 else cfg.batch_size,
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus,
    )


def run_images(cfg: CurateConfig, todo: list[InputShard], rules, spec, scorer, log, read_fn=None, read_kwargs=None,
               write_shards: dict | None = None) -> None:
    """Score and commit ``todo``; urls mode passes its download-and-read stage (``read_fn``) and the
    downloaded shards the writer reads (``write_shards``, by name)."""
    import ray

    from shardsmith.pipelines.core.dispatch import Dispatcher, ShardCollector, progress_on_commit, stream_to_writers
    from shardsmith.pipelines.core.progress import Progress
    from shardsmith.pipelines.core.resources import cluster_resources, node_cpus, plan_resources
    from shardsmith.pipelines.formats.img2dataset import expected_rows
    from shardsmith.pipelines.sinks.curated import write_image_shard
    from shardsmith.pipelines.stages.batch import results_table

    cpus, gpus = cluster_resources()
    plan = plan_resources(cpus, gpus, cfg.device, cfg.num_actors, cfg.actor_cpus, nodes=node_cpus())
    log(f"ray: {cpus:g} CPU, {gpus:g} GPU; {plan.describe()}")
    progress = Progress("curate", expected_rows(todo), len(todo), enabled=cfg.progress)
    ds = build_dataset(todo, cfg, spec, scorer.pixel_transform, scorer.embedder.image_size, plan, read_fn, read_kwargs)
    by_name = write_shards or {s.name: s for s in todo}
    writer = ray.remote(num_cpus=plan.write_cpus, max_retries=3)(write_image_shard)
    names = spec.scores.names

    def submit(name: str, rows: pa.Table | None):
        table, emb, nodes, scorers = results_table(rows, names, embed_dim=scorer.embedder.embed_dim)
        return writer.remote(by_name[name], table, rules, cfg.output, names, emb if cfg.embeddings else None,
                             {"node_ids": nodes, "scored_by": scorers})

    # No prefetching: the rows are small, and a prefetching iterator hands each block over only
    # when the next one is ready (a scored batch late), which delays every shard's commit.
    stream_to_writers(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0), ShardCollector(),
                      submit, Dispatcher(max(4, 2 * int(cpus)), progress_on_commit(progress)), progress)


def url_stage(cfg: CurateConfig, todo: list, rules) -> dict:
    """What the images dataflow needs to run on URL shards: the download-and-read stage and the
    downloaded shards its writer copies from (keyword arguments of ``run_images``)."""
    from shardsmith.pipelines.core import fs as fsutil
    from shardsmith.pipelines.core.layout import OutputLayout
    from shardsmith.pipelines.stages.download import DOWNLOADED_DIR, DownloadOptions, as_input_shard, download_and_read
    from shardsmith.pipelines.stages.read import read_batch_rows

    dest = fsutil.join(cfg.output, DOWNLOADED_DIR)
    return {"read_fn": download_and_read,
            "read_kwargs": {"url_shards": {s.name: s for s in todo}, "dest": dest,
                            "tmp_dir": OutputLayout(cfg.output).tmp_dir, "rules": rules,
                            "options": DownloadOptions.from_config(cfg), "per_shard": cfg.urls_per_shard,
                            "rows_per_batch": read_batch_rows(cfg.batch_size)},
            "write_shards": {s.name: as_input_shard(dest, s.name) for s in todo}}


def duplicate_keys_across_shards(output: str, names: list[str], examples: int = 20) -> dict:
    """Keys found in more than one shard's scores (within a shard, a repeated key is already an
    error row); reading the key columns only."""
    import pyarrow.parquet as pq

    first: dict[str, str] = {}
    dups: dict[str, list[str]] = {}
    for name in names:
        with fsutil.open_file(fsutil.join(output, "scores", f"{name}.parquet")) as f:
            keys = pq.read_table(f, columns=["key", "reason"], use_threads=False)
        for k, reason in zip(keys.column("key").to_pylist(), keys.column("reason").to_pylist()):
            if reason == "duplicate_key" or k is None:
                continue
            if k in first and first[k] != name:
                dups.setdefault(k, [first[k]]).append(name)
            first.setdefault(k, name)
    return {"count": len(dups), "examples": [{"key": k, "shards": v} for k, v in list(dups.items())[:examples]]}
