"""The curate dataflow on Ray Data.

    shards -> read + decode (CPU tasks: tar stream -> samples -> model pixels, batch by batch)
           -> score (actor pool: one CLIP image forward + heads + caption similarity)
           -> driver: gather a shard's rows -> write (CPU task: rules, scores parquet,
              curated tar + parquet, embeddings, ledger commit)

Only small rows reach the driver (key, scores, size, caption): image bytes stay in the read
tasks (only model-size pixels travel to the actors, in blocks of one forward batch), and the
writer copies the kept samples from the source tar untouched. Each shard also sends one sentinel
row (``row == -1``) carrying its sample count, so the driver knows when a shard is complete
however the rows are interleaved.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardsmith.filters.clip import ClipSpec
from shardsmith.filters.scorer import Scorer, ScorerSpec
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.core.dispatch import SENTINEL, ShardCollector, drive
from shardsmith.pipelines.config.curate import CurateConfig
from shardsmith.pipelines.stages.decode import DecodeError, decode
from shardsmith.pipelines.core.ledger import RunError
from shardsmith.pipelines.formats.tar import iter_tar_samples
from shardsmith.pipelines.formats.inputs import InputShard

READ_BATCH = 64


TEXT_COLUMNS = ("key", "caption", "url", "error_kind", "error")


def text_columns(batch: dict) -> dict:
    """The batch with its text columns as object arrays of str/None: a column that reached a stage
    as float NaN (all None upstream) must not leave it as floats, or the driver cannot merge it."""
    for c in TEXT_COLUMNS:
        if c in batch:
            batch[c] = np.array([text(v) for v in batch[c]], dtype=object)
    return batch


def text(v) -> str | None:
    """A string cell of a Ray batch, or None. Ray turns an object column holding only None into a
    null-typed Arrow column, which the next stage sees as float NaN: never test ``is None``."""
    return v if isinstance(v, str) else None


def read_shard_rows(batch: dict, rows_per_batch: int = READ_BATCH) -> "Iterator[dict]":  # noqa: F821
    """Ray Data UDF: one input row per shard -> batches of samples (bytes), each shard followed by
    its sentinel.

    The shards of one call are read in turn and their rows packed across shard boundaries into
    batches holding exactly ``rows_per_batch`` samples with an image, plus the rows that need no
    forward (sentinels, samples the reader already marked as errors): the scoring actor's forwards
    have a fixed size (a short chunk is padded), so a batch holding a shard's short tail would
    spend a forward on padding. Packed, only the last batch of the call is short."""
    limits = batch["limit"] if "limit" in batch else [0] * len(batch["shard"])
    buf: list = []
    images = 0  # rows of ``buf`` that will need a forward
    for name, url, limit in zip(batch["shard"], batch["url"], limits):
        name = str(name)
        count = 0
        for s in iter_tar_samples(str(url)):
            if limit and count >= limit:
                break
            count += 1
            url_field = None
            if "json" in s.members:
                try:
                    meta = json.loads(s.members["json"])
                    url_field = meta.get("url") if isinstance(meta, dict) else None
                except (ValueError, UnicodeDecodeError):
                    url_field = None
            buf.append((name, s.row, s.key, s.image if s.error_kind is None else None, s.caption(),
                        str(url_field) if url_field is not None else None, s.error_kind, s.error, -1))
            images += s.error_kind is None
            if images >= rows_per_batch:
                yield _sample_batch(buf)
                buf, images = [], 0
        buf.append((name, SENTINEL, None, None, None, None, None, None, count))
    if buf:
        yield _sample_batch(buf)


def _sample_batch(rows: list) -> dict:
    """Rows ``(shard, row, key, image, caption, url, error_kind, error, shard_rows)`` -> columns;
    ``shard_rows`` is the shard's sample count on its sentinel row, -1 elsewhere."""
    cols = list(zip(*rows))
    return {
        "shard": np.array(cols[0], dtype=object),
        "row": np.array(cols[1], dtype=np.int64),
        "key": np.array(cols[2], dtype=object),
        "image": np.array(cols[3], dtype=object),
        "caption": np.array(cols[4], dtype=object),
        "url": np.array(cols[5], dtype=object),
        "error_kind": np.array(cols[6], dtype=object),
        "error": np.array(cols[7], dtype=object),
        "shard_rows": np.array(cols[8], dtype=np.int64),
    }


def decode_batch(batch: dict, pixel_transform, image_size: tuple[int, int], max_pixels: int,
                 exif_transpose: bool, detect_generated: bool = False, fast: bool = False) -> dict:
    """Ray Data UDF (CPU tasks): image bytes -> model-size uint8 pixels + original size.
    ``fast``: reduced-size JPEG decoding (``--fast-decode``, see pipelines.decode.decode)."""
    draft_size = image_size[::-1] if fast else None  # PIL sizes are (width, height)
    n = len(batch["row"])
    pixels = np.zeros((n, *image_size, 3), dtype=np.uint8)
    width = np.full(n, -1, dtype=np.int64)
    height = np.full(n, -1, dtype=np.int64)
    generated = np.full(n, -1, dtype=np.int8)  # -1 = not known
    kinds = list(batch["error_kind"])
    errors = list(batch["error"])
    for i in range(n):
        if batch["row"][i] == SENTINEL or text(kinds[i]) is not None:
            continue
        try:
            d = decode(batch["image"][i], pixel_transform, max_pixels, exif_transpose, detect_generated, draft_size)
        except DecodeError as e:
            kinds[i], errors[i] = e.kind, e.message
            continue
        pixels[i], width[i], height[i] = d.pixels, d.width, d.height
        if d.generated is not None:
            generated[i] = int(d.generated)
    out = {k: v for k, v in batch.items() if k != "image"}
    out.update(pixels=pixels, original_width=width, original_height=height, generated=generated,
               error_kind=np.array(kinds, dtype=object), error=np.array(errors, dtype=object))
    return text_columns(out)


class ScoreStage:
    """Ray Data UDF (actor pool): the model is loaded once per actor."""

    def __init__(self, spec: ScorerSpec, device: str, threads: int, keep_embeddings: bool, batch_size: int):
        import torch

        torch.set_num_threads(threads)
        self.scorer = Scorer(spec, device=device)
        self.batch_size = batch_size
        self.keep_embeddings = keep_embeddings
        from shardsmith.pipelines.core.resources import node_id

        self.node_id = node_id()
        # One id per actor process: a restarted actor (after a crash) shows up as a new one.
        self.instance = f"{self.node_id[:12]}-{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        n = len(batch["row"])
        ok = np.array([batch["row"][i] != SENTINEL and text(batch["error_kind"][i]) is None for i in range(n)],
                      dtype=bool)
        scores = {name: np.full(n, np.nan, dtype=np.float32) for name in ("aesthetic", "pwatermark", "punsafe", "similarity")}
        emb = None
        if ok.any():
            captions = [c if isinstance(c, str) else "" for c in batch["caption"][ok]]
            res = self.scorer.score(batch["pixels"][ok], captions, fixed_batch=self.batch_size)
            for name in scores:
                if name in res:
                    scores[name][ok] = res[name]
            if self.keep_embeddings:
                emb = np.zeros((n, res["embedding"].shape[1]), dtype=np.float16)
                emb[ok] = res["embedding"].astype(np.float16)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out.update(scores)
        computed = set(self.scorer.heads) | ({"similarity"} if self.scorer.spec.similarity else set())
        for name in scores:
            if name not in computed:
                out[name] = np.full(n, np.nan, dtype=np.float32)
        out["node_id"] = np.array([self.node_id] * n, dtype=object)
        out["scorer"] = np.array([self.instance] * n, dtype=object)
        if self.keep_embeddings:
            if emb is None:
                emb = np.zeros((n, self.scorer.embedder.embed_dim), dtype=np.float16)
            out["embedding"] = emb
        return text_columns(out)


READ_GROUP_BYTES = 256 * 1024**2  # shards are read in groups of about this many bytes (at least one shard)


def read_tasks(shards: list[InputShard], num_actors: int) -> int:
    """How many read tasks: shards grouped to about READ_GROUP_BYTES each, but at least as many
    tasks as scoring actors (so that every actor has input) and at most one per shard. Each read
    task's last batch is short, so fewer tasks means fewer padded forwards; img2dataset's
    10,000-sample shards (~1 GB) each get their own task anyway."""
    total = sum(s.size or READ_GROUP_BYTES for s in shards)
    return max(1, min(len(shards), max(num_actors, -(-total // READ_GROUP_BYTES))))


def read_batch_rows(batch_size: int) -> int:
    """Rows per read batch: a multiple of the forward size (at least READ_BATCH), so that the
    batches the scoring actor receives fill whole forwards."""
    return batch_size * max(1, READ_BATCH // batch_size)


def read_decode_rows(batch: dict, rows_per_batch: int, decode_kwargs: dict) -> "Iterator[dict]":  # noqa: F821
    """Ray Data UDF (CPU tasks): read shards and decode each batch of samples as it is read.

    Decoding in the read task keeps image bytes out of the object store, and yields batches whose
    size in bytes is fixed by the model's input size: with ``pixel_block_bytes`` as the dataset's
    target block size, each yielded batch is one block (``rows_per_batch`` samples to score, plus
    sentinels and reader errors)."""
    for b in read_shard_rows(batch, rows_per_batch=rows_per_batch):
        yield decode_batch(b, **decode_kwargs)


def pixel_block_bytes(rows: int, image_size: tuple[int, int]) -> int:
    """Target block size for batches of ``rows`` decoded images. Ray Data cuts a task's output into
    blocks when it exceeds the target, and slices blocks of 1.5x the target: a batch of a bit more
    than 1.25x the target (pixels plus a few small columns) is passed on alone and whole. The
    default target (128 MiB) held a whole shard in one block, so nothing streamed within a shard
    and a small dataset went to one actor in one piece."""
    return int(0.8 * rows * image_size[0] * image_size[1] * 3)


@contextmanager
def block_size(target: int):
    """Datasets created inside take ``target`` as their block size (they keep the DataContext they
    were created with); the process's own setting is restored on exit."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.target_max_block_size
    ctx.target_max_block_size = target
    try:
        yield
    finally:
        ctx.target_max_block_size = saved


def build_dataset(shards: list[InputShard], cfg: CurateConfig, spec: ScorerSpec, pixel_transform,
                  image_size: tuple[int, int], plan, read_fn=None, read_kwargs: dict | None = None):
    """``read_fn`` replaces the tar reader (urls mode: download, then read the downloaded tar; there
    decode stays a stage of its own)."""
    import ray
    from ray.data import ActorPoolStrategy

    from shardsmith.pipelines.core.resources import TASK_STAGE_ARGS

    items = [{"shard": s.name, "url": s.url} for s in shards]
    decode_kwargs = {"pixel_transform": pixel_transform, "image_size": image_size,
                     "max_pixels": cfg.max_image_pixels, "exif_transpose": cfg.exif_transpose,
                     "detect_generated": cfg.detect_generated, "fast": cfg.fast_decode}
    if read_fn is None:
        # Small shards are read in groups (one task per group: one input block each), their rows
        # packed into batches of a multiple of the forward size (read_shard_rows), decoded in the
        # same task and passed on one batch per block, so every forward is full but the last one
        # of each group.
        rows = read_batch_rows(cfg.batch_size)
        with block_size(pixel_block_bytes(rows, image_size)):
            ds = ray.data.from_items(items, override_num_blocks=read_tasks(shards, plan.num_actors))
        ds = ds.map_batches(read_decode_rows, fn_kwargs={"rows_per_batch": rows, "decode_kwargs": decode_kwargs},
                            batch_size=None, num_cpus=plan.decode_cpus, zero_copy_batch=True, **TASK_STAGE_ARGS)
    else:
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds = ds.map_batches(read_fn, fn_kwargs=read_kwargs, batch_size=1, num_cpus=plan.read_cpus,
                            zero_copy_batch=True, **TASK_STAGE_ARGS)
        ds = ds.map_batches(decode_batch, fn_kwargs=decode_kwargs, batch_size=cfg.decode_batch_size,
                            num_cpus=plan.decode_cpus, **TASK_STAGE_ARGS)
    ds = ds.map_batches(
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
    return ds


RESULT_COLUMNS = ["row", "key", "caption", "url", "error_kind", "error", "aesthetic", "pwatermark",
                  "punsafe", "similarity", "original_width", "original_height", "generated"]


def shard_results(t: pa.Table | None, embed_dim: int) -> tuple[pa.Table, np.ndarray | None, list[str], list[str]]:
    """A complete shard's rows (sentinel removed, in row order) -> results table, embeddings, nodes."""
    if t is None:  # an empty shard
        t = pa.table({"row": pa.array([], pa.int64()), **{c: pa.array([], pa.string()) for c in
                      ("key", "caption", "url", "error_kind", "error", "node_id")},
                      **{c: pa.array([], pa.float32()) for c in ("aesthetic", "pwatermark", "punsafe", "similarity")},
                      **{c: pa.array([], pa.int64()) for c in ("original_width", "original_height")},
                      "generated": pa.array([], pa.int8())})
    emb = None
    if "embedding" in t.column_names:
        emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    elif t.num_rows == 0:
        emb = np.zeros((0, embed_dim), np.float16)
    nodes = sorted({n for n in t.column("node_id").to_pylist() if text(n)}) if "node_id" in t.column_names else []
    scorers = sorted({n for n in t.column("scorer").to_pylist() if text(n)}) if "scorer" in t.column_names else []
    res = t.select([c for c in RESULT_COLUMNS if c in t.column_names])
    for c in ("key", "caption", "url", "error_kind", "error"):
        res = res.set_column(res.column_names.index(c), c, pa.array([text(v) for v in res.column(c).to_pylist()],
                                                                    pa.string()))
    # -1 means "no size" (the image was not decoded), NaN "no score": both are nulls on disk
    for c in ("original_width", "original_height"):
        col = res.column(c)
        res = res.set_column(res.column_names.index(c), c, pc.if_else(pc.less(col, 0), pa.scalar(None, col.type), col))
    for c in ("aesthetic", "pwatermark", "punsafe", "similarity"):
        col = res.column(c)
        res = res.set_column(res.column_names.index(c), c, pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col))
    g = res.column("generated")
    res = res.set_column(res.column_names.index("generated"), "generated",
                         pc.if_else(pc.less(g, 0), pa.scalar(None, pa.bool_()), pc.cast(g, pa.bool_())))
    return res, emb, nodes, scorers


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

OUTPUT_PARTS = ("scores", "curated", "img_emb", "metadata", "_ledger", "_tmp", "manifest.json", "stats.json",
                "report.html", "report", "downloaded")


def prepare_output(cfg: CurateConfig, layout, shards: list[InputShard], mode: str, models: dict) -> dict:
    """Check or start the run manifest; --overwrite removes what an earlier run wrote."""
    from shardsmith.pipelines.core.ledger import start_run

    config = {k: v for k, v in cfg.__dict__.items() if k not in ("overwrite",)}
    return start_run(layout, "shardsmith curate", {**cfg.fingerprint(), "mode": mode}, config, models,
                     [s.to_dict() for s in shards], cfg.overwrite, OUTPUT_PARTS)


def check_rules_against_scores(cfg: CurateConfig, mode: str, spec: ScorerSpec) -> None:
    from shardsmith.pipelines.config.curate import ConfigError

    if mode not in ("images", "urls"):
        return
    computed = set(spec.computed())
    flag = {"aesthetic": "--aesthetic-head", "pwatermark": "--watermark-head", "punsafe": "--nsfw-head",
            "similarity": "similarity (enabled by default)"}
    for rule in cfg.ruleset().rules:
        for need in rule.needs():
            if need in flag and need not in computed:
                raise ConfigError(
                    f"rule '{rule.name}' needs the {need!r} score, which is not computed: give "
                    f"{flag[need]}, or choose a preset/rules without it (--preset none --rule ...)")


def run_curate(cfg: CurateConfig, log=print) -> dict:
    """Plan, validate, run and commit; returns the run's stats (also written to stats.json)."""
    from shardsmith.pipelines.core.ledger import Ledger, OutputLayout, aggregate, write_json
    from shardsmith.pipelines.sinks.metadata import filter_metadata_shard
    from shardsmith.pipelines.core.progress import summary
    from shardsmith.pipelines.core.resources import ray_session
    from shardsmith.pipelines.formats.inputs import plan_shards

    cfg.validate()
    rules = cfg.ruleset()
    needs = rules.needs()
    if cfg.mode == "urls":  # LAION metadata -> fetched images -> the images pipeline
        from shardsmith.pipelines.stages.download import plan_url_shards

        mode, shards = "urls", plan_url_shards(cfg.input, cfg.urls_per_shard)
    else:
        mode, shards = plan_shards(cfg.input, cfg.mode, required_columns=needs)
    spec = ScorerSpec(ClipSpec(cfg.clip_model, cfg.clip_pretrained), cfg.heads(), similarity=cfg.similarity)
    check_rules_against_scores(cfg, mode, spec)
    layout = OutputLayout(cfg.output)

    scorer = None
    models: dict = {}
    if mode in ("images", "urls"):
        # Check the model and the heads here, so that a bad one fails before any work starts: the
        # CLIP model is built on the meta device (architecture, checkpoint keys and shapes,
        # preprocessing; no weights in memory), the actors load the real ones.
        scorer = Scorer(spec, device="meta")
        models = {"clip_model": cfg.clip_model, "clip_pretrained": cfg.clip_pretrained,
                  "embed_dim": scorer.embedder.embed_dim, "heads": cfg.heads(),
                  "computed": spec.computed(),
                  "not_computed": [h for h in ("aesthetic", "pwatermark", "punsafe", "similarity")
                                   if h not in spec.computed()]}
    manifest = prepare_output(cfg, layout, shards, mode, models)
    ledger = Ledger(layout)
    ledger.clean_tmp()
    committed = ledger.committed()
    retry = []
    if mode == "urls" and cfg.retry_failed:  # committed shards with failures to fetch again
        from shardsmith.pipelines.stages.download import shards_to_retry

        retry = shards_to_retry(committed, [s.name for s in shards], cfg.retry_kinds, layout)
    todo = [s for s in shards if s.name not in committed or s.name in retry]
    log(f"shardsmith curate: {len(shards)} shard(s) in {cfg.input} ({mode} mode); "
        f"{len(shards) - len(todo)} already committed, {len(todo)} to do"
        + (f" ({len(retry)} committed with failures to retry: {', '.join(cfg.retry_kinds)})" if retry else ""))
    log(f"rules: {', '.join(rules.names) or '(none: keep every readable row)'}")
    if models.get("not_computed"):
        log(f"not computed (no weights given, column left null): {', '.join(models['not_computed'])}")
    t0 = time.time()
    if todo:
        with ray_session(cfg.address):
            if mode == "images":
                _run_images(cfg, todo, rules, spec, scorer, layout, log)
            elif mode == "urls":
                from shardsmith.pipelines.stages.download import url_stage

                _run_images(cfg, todo, rules, spec, scorer, layout, log, **url_stage(cfg, todo, rules, layout))
            else:
                _run_metadata(cfg, todo, rules, layout, filter_metadata_shard, log)
    scorer = None
    entries = ledger.committed()
    missing = [s.name for s in shards if s.name not in entries]
    if missing:
        raise RunError(f"{len(missing)} shard(s) were not committed: {', '.join(missing[:10])}; rerun to resume")
    stats = aggregate({s.name: entries[s.name] for s in shards})
    if mode == "images":
        stats["duplicate_keys_across_shards"] = duplicate_keys_across_shards(layout, [s.name for s in shards])
        dup = stats["duplicate_keys_across_shards"]
        if dup["count"]:
            log(f"warning: {dup['count']} key(s) appear in more than one shard, e.g. {dup['examples'][:3]} "
                "(each shard's rows are still accounted for; see stats.json duplicate_keys_across_shards)")
    stats["mode"] = mode
    stats["rules"] = rules.names
    stats["scores_computed"] = models.get("computed", [])
    stats["scores_not_computed"] = models.get("not_computed", [])
    stats["seconds_this_run"] = round(time.time() - t0, 3)
    write_json(layout.stats, stats, tmp_dir=layout.tmp_dir)
    manifest["finished_at"] = time.time()
    write_json(layout.manifest, manifest, tmp_dir=layout.tmp_dir)
    ledger.clean_tmp()
    notes = []
    if stats["scores_not_computed"]:
        notes.append(f"\nnot computed (null columns): {', '.join(stats['scores_not_computed'])}")
    notes.append(f"\noutputs in {cfg.output}: scores/, curated/, stats.json, manifest.json")
    log(summary(stats, f"\ncurate summary ({mode} mode, {stats['shards_committed']} shards)", notes))
    if cfg.report:
        from shardsmith.pipelines.report import report_after_run

        report_after_run(cfg.output, log=log)  # a failure is a warning: the data is committed
    return stats


def _run_images(cfg, todo, rules, spec, scorer, layout, log, read_fn=None, read_kwargs=None,
                write_shards: dict | None = None) -> None:
    """The images dataflow; urls mode passes its download-and-read stage (``read_fn``) and the
    downloaded shards the writer reads (``write_shards``, by name)."""
    import ray

    from shardsmith.pipelines.core.progress import Progress
    from shardsmith.pipelines.formats.tar import read_index_parquet  # noqa: F401  (workers import it too)
    from shardsmith.pipelines.core.resources import cluster_resources, node_cpus, plan_resources
    from shardsmith.pipelines.sinks.curated import write_image_shard

    cpus, gpus = cluster_resources()
    plan = plan_resources(cpus, gpus, cfg.device, cfg.num_actors, cfg.actor_cpus, nodes=node_cpus())
    log(f"ray: {cpus:g} CPU, {gpus:g} GPU; {plan.describe()}")
    pixel_transform, image_size = scorer.pixel_transform, scorer.embedder.image_size
    total = _expected_rows(todo)
    progress = Progress("curate", total, len(todo), enabled=cfg.progress)
    ds = build_dataset(todo, cfg, spec, pixel_transform, image_size, plan, read_fn, read_kwargs)
    by_name = write_shards or {s.name: s for s in todo}
    writer = ray.remote(num_cpus=plan.write_cpus, max_retries=3)(write_image_shard)

    def submit(name: str, rows: pa.Table | None):
        table, emb, nodes, scorers = shard_results(rows, embed_dim=scorer.embedder.embed_dim)
        return writer.remote(by_name[name], table, rules, cfg.output, emb if cfg.embeddings else None,
                             {"node_ids": nodes, "scored_by": scorers})

    # No prefetching: the rows are small, and a prefetching iterator hands each block over only
    # when the next one is ready (a scored batch late), which delays every shard's commit.
    drive(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0), ShardCollector(),
          submit, progress)


def duplicate_keys_across_shards(layout, names: list[str], examples: int = 20) -> dict:
    """Keys found in more than one shard's scores (within a shard, a repeated key is already an
    error row); reading the key columns only."""
    import pyarrow.parquet as pq

    first: dict[str, str] = {}
    dups: dict[str, list[str]] = {}
    for name in names:
        with fsutil.open_file(layout.path("scores", f"{name}.parquet")) as f:
            keys = pq.read_table(f, columns=["key", "reason"], use_threads=False)
        for k, reason in zip(keys.column("key").to_pylist(), keys.column("reason").to_pylist()):
            if reason == "duplicate_key" or k is None:
                continue
            if k in first and first[k] != name:
                dups.setdefault(k, [first[k]]).append(name)
            first.setdefault(k, name)
    ex = [{"key": k, "shards": v} for k, v in list(dups.items())[:examples]]
    return {"count": len(dups), "examples": ex}


def _expected_rows(shards: list[InputShard]) -> int | None:
    """Rows to expect, from the img2dataset parquet indexes when every shard has one."""
    import pyarrow.parquet as pq

    total = 0
    for s in shards:
        if not s.index_url:
            return None
        try:
            with fsutil.open_file(s.index_url) as f:
                t = pq.read_table(f, columns=None, use_threads=False)
            if "status" in t.column_names:
                total += int(pc.sum(pc.equal(t.column("status"), "success")).as_py() or 0)
            else:
                total += t.num_rows
        except Exception:
            return None
    return total


def _run_metadata(cfg, todo, rules, layout, filter_fn, log) -> None:
    """One Ray task per metadata file, a window of them in flight. Plain tasks, not a Ray Data
    dataset: each file is one independent unit with no data passed between stages, and Ray Data's
    executor added about a second to a run of a few files (bench/metadata_filter.py)."""
    import ray

    from shardsmith.pipelines.core.progress import Progress
    from shardsmith.pipelines.core.resources import cluster_resources

    progress = Progress("curate", None, len(todo), enabled=cfg.progress)
    # One CPU per file: the work is CPU-bound, and on a 2-CPU node two tasks of half a CPU each
    # beyond the first two start worker processes that Ray reaps when idle (restarted next run).
    task = ray.remote(num_cpus=1, max_retries=3)(filter_fn)  # each file is written atomically: a retry is safe
    window = max(4, int(4 * cluster_resources()[0]))
    pending, inflight = list(reversed(todo)), []
    while pending or inflight:
        while pending and len(inflight) < window:
            inflight.append(task.remote(pending.pop(), rules, cfg.output))
        ready, inflight = ray.wait(inflight, num_returns=1)
        for entry in ray.get(ready):  # raises the task's error, if any
            progress.update(rows=int(entry["rows_read"]), shards=1)
    progress.update(force=True)
