"""curate's images dataflow on Ray Data (images mode, and urls mode after the download):

    shards -> read (CPU tasks: tar stream -> batches of samples, a forward's worth each;
              urls mode: download, then read the downloaded tar)
           -> score (actor pool: on CPU each actor decodes its batch in a thread pool, then one
              CLIP image forward + heads + caption similarity; on GPU decode is a CPU task stage
              before it)
           -> driver: gather a shard's rows -> write (CPU task: rules, scores parquet,
              curated tar + parquet, embeddings, ledger commit; sinks/curated.py)
"""

from __future__ import annotations

import pyarrow as pa

from shardsmith.pipelines.config import CurateConfig
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.formats.inputs import InputShard

ACTORS_START_S = 600  # the CPU pool waits this long for all its actors before the blocks flow


def cpu_pool_context(ctx) -> None:
    """Ray Data settings for a CPU pool whose actors decode: the blocks flow once every actor is
    up, each actor holds one block at a time, and an idle actor is chosen without regard to where
    the block lies. Otherwise the first actor up queues blocks (up to 4 deep) while the others idle,
    and the locality preference sends small blocks - inlined into the driver's memory, so "on" the
    head node - to the head node's actor whenever it is free: on 2 loopback nodes one actor scored
    both shards. A block is a forward batch of encoded samples (small to move; moving it costs
    milliseconds against seconds of decode and forwards)."""
    import warnings

    ctx.wait_for_min_actors_s = ACTORS_START_S
    with warnings.catch_warnings():  # deprecated in Ray 2.60 ("Ray Data manages locality"), still honoured
        warnings.simplefilter("ignore")
        ctx.execution_options.actor_locality_enabled = False


def build_dataset(shards: list[InputShard], cfg: CurateConfig, spec, pixel_transform, image_size: tuple[int, int],
                  plan, read_fn=None, read_kwargs: dict | None = None):
    """The read -> decode -> score chain; on CPU (``plan.decode_in_actor``) the scoring actors
    decode. ``read_fn`` replaces the tar reader (urls mode: download, then read the downloaded tar;
    on GPUs decode is then a stage of its own)."""
    import ray

    from shardsmith.pipelines.core.resources import TASK_STAGE_ARGS, actor_pool
    from shardsmith.pipelines.stages.decode import decode_batch
    from shardsmith.pipelines.stages.read import (block_size, pixel_block_bytes, read_batch_rows, read_decode_rows,
                                                  read_shard_rows, read_tasks, sample_block_bytes)
    from shardsmith.pipelines.stages.score import ScoreStage

    if plan.decode_in_actor:  # (a Dataset keeps the context it was made in: set before it is made)
        cpu_pool_context(ray.data.DataContext.get_current())
    items = [{"shard": s.name, "url": s.url} for s in shards]
    decode_kwargs = {"pixel_transform": pixel_transform, "image_size": image_size,
                     "max_pixels": cfg.max_image_pixels, "exif_transpose": cfg.exif_transpose,
                     "detect_generated": cfg.detect_generated, "fast": cfg.fast_decode}
    pixel_inputs = spec.pixel_inputs() if spec is not None else {}
    if pixel_inputs:  # a model that reads pixels of its own (LAION's watermark classifier)
        decode_kwargs["pixel_inputs"] = pixel_inputs
    rows = read_batch_rows(cfg.batch_size)
    if read_fn is None:
        # Small shards are read in groups (one task per group: one input block each), their rows
        # packed into batches of a multiple of the forward size (read_shard_rows) and passed on one
        # batch per block, so every forward is full but the last one of each group. On CPU the
        # actors decode (sample blocks hold image bytes); otherwise the read task decodes too.
        target = (sample_block_bytes(rows, shards) if plan.decode_in_actor
                  else pixel_block_bytes(rows, image_size, [pi.size for pi in pixel_inputs.values()]))
        with block_size(target):
            ds = ray.data.from_items(items, override_num_blocks=read_tasks(shards, plan.num_actors))
        if plan.decode_in_actor:
            ds = ds.map_batches(read_shard_rows, fn_kwargs={"rows_per_batch": rows}, batch_size=None,
                                num_cpus=plan.read_cpus, zero_copy_batch=True, **TASK_STAGE_ARGS)
        else:
            ds = ds.map_batches(read_decode_rows, fn_kwargs={"rows_per_batch": rows, "decode_kwargs": decode_kwargs},
                                batch_size=None, num_cpus=plan.decode_cpus, zero_copy_batch=True, **TASK_STAGE_ARGS)
    else:
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds = ds.map_batches(read_fn, fn_kwargs=read_kwargs, batch_size=1, num_cpus=plan.read_cpus,
                            zero_copy_batch=True, **TASK_STAGE_ARGS)
        if not plan.decode_in_actor:
            ds = ds.map_batches(decode_batch, fn_kwargs=decode_kwargs, batch_size=cfg.decode_batch_size,
                                num_cpus=plan.decode_cpus, **TASK_STAGE_ARGS)
    return ds.map_batches(
        ScoreStage,
        fn_constructor_args=(spec, plan.device, plan.torch_threads, cfg.embeddings, cfg.batch_size,
                             decode_kwargs if plan.decode_in_actor else None),
        # Start the whole pool at once: Ray Data spreads the actors over the nodes, and a pool that
        # starts at one actor only grows under backpressure, which a small run never builds.
        # On CPU one block in flight per actor (see cpu_pool_context).
        compute=actor_pool(plan.num_actors, initial_size=plan.num_actors,
                           max_tasks_in_flight_per_actor=1 if plan.decode_in_actor else None),
        # On CPU, one read batch per call (whole blocks: a forward batch of samples plus the rows
        # that need none), so that no forward is padded but the last; Ray Data refuses whole
        # blocks for GPU stages, where a padded forward also costs far less.
        batch_size=None if plan.actor_gpus == 0 else cfg.batch_size,
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus,
    )


def run_images(cfg: CurateConfig, todo: list[InputShard], rules, spec, scorer, log, read_fn=None, read_kwargs=None,
               write_shards: dict | None = None) -> None:
    """Score and commit ``todo``; urls mode passes its download-and-read stage (``read_fn``) and the
    downloaded shards the writer reads (``write_shards``, by name)."""
    import ray

    from shardsmith.errors import RunError
    from shardsmith.pipelines.core.dispatch import (
        Dispatcher,
        ShardCollector,
        progress_on_commit,
        stop_dataset,
        stream_to_writers,
    )
    from shardsmith.pipelines.core.layout import OutputLayout
    from shardsmith.pipelines.core.ledger import Ledger
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

    precisions = {p for e in Ledger(OutputLayout(cfg.output)).committed().values() for p in e.get("precision", [])}

    def submit(name: str, rows: pa.Table | None):
        table, emb, provenance = results_table(rows, names, embed_dim=scorer.embedder.embed_dim)
        if precisions and not set(provenance["precision"]) <= precisions:  # a resumed run cannot mix them
            raise RunError(f"shard {name} was scored in {', '.join(provenance['precision'])} but {cfg.output} holds "
                           f"shards scored in {', '.join(sorted(precisions))}: rerun with --precision "
                           f"{sorted(precisions)[0]} (or --overwrite)")
        precisions.update(provenance["precision"])
        return writer.remote(by_name[name], table, rules, cfg.output, names, emb if cfg.embeddings else None,
                             provenance)

    # No prefetching: the rows are small, and a prefetching iterator hands each block over only
    # when the next one is ready (a scored batch late), which delays every shard's commit.
    dispatcher = Dispatcher(max(4, 2 * int(cpus)), progress_on_commit(progress), cfg.stall_timeout, stage="write")
    stream_to_writers(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0), ShardCollector(),
                      submit, dispatcher, progress, stage="score", names=[s.name for s in todo],
                      on_stop=lambda e: stop_dataset(ds, e))


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
