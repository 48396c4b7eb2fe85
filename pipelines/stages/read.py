"""The read stage (CPU tasks): input shards -> batches of samples, or of decoded samples.

Reads: one row per shard (``shard``, ``url``, optional ``limit``). Writes: SAMPLE columns
(``stages/batch.py``), or DECODED ones when reading and decoding in the same task
(``read_decode_rows``, curate's images mode: image bytes then never enter the object store).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator

from shardsmith.pipelines.formats.inputs import InputShard
from shardsmith.pipelines.formats.tar import iter_tar_samples
from shardsmith.pipelines.stages.batch import SENTINEL, sample_batch

READ_BATCH = 64


def read_shard_rows(batch: dict, rows_per_batch: int = READ_BATCH) -> Iterator[dict]:
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
                yield sample_batch(buf)
                buf, images = [], 0
        buf.append((name, SENTINEL, None, None, None, None, None, None, count))
    if buf:
        yield sample_batch(buf)


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


def read_decode_rows(batch: dict, rows_per_batch: int, decode_kwargs: dict) -> Iterator[dict]:
    """Ray Data UDF (CPU tasks): read shards and decode each batch of samples as it is read.

    Decoding in the read task keeps image bytes out of the object store, and yields batches whose
    size in bytes is fixed by the model's input size: with ``pixel_block_bytes`` as the dataset's
    target block size, each yielded batch is one block (``rows_per_batch`` samples to score, plus
    sentinels and reader errors)."""
    from shardsmith.pipelines.stages.decode import decode_batch

    for b in read_shard_rows(batch, rows_per_batch=rows_per_batch):
        yield decode_batch(b, **decode_kwargs)


def pixel_block_bytes(rows: int, image_size: tuple[int, int], extra_sizes: tuple = ()) -> int:
    """Target block size for batches of ``rows`` decoded images. Ray Data cuts a task's output into
    blocks when it exceeds the target, and slices blocks of 1.5x the target: a batch of a bit more
    than 1.25x the target (pixels plus a few small columns) is passed on alone and whole. The
    default target (128 MiB) held a whole shard in one block, so nothing streamed within a shard
    and a small dataset went to one actor in one piece. ``extra_sizes``: the (h, w) of the extra
    pixel columns of the run (models that read pixels of their own)."""
    return int(0.8 * rows * sum(h * w * 3 for h, w in (tuple(image_size), *map(tuple, extra_sizes))))


def sample_block_bytes(rows: int, shards: list[InputShard]) -> int:
    """Target block size for batches of ``rows`` samples as bytes (when the actors decode): the
    shards' mean bytes per sample, from their sizes and their indexes' row counts where known."""
    from shardsmith.pipelines.formats.img2dataset import expected_rows

    total = sum(s.size or 0 for s in shards)
    n = expected_rows(shards) if total else None
    per_sample = total / n if n else 150_000  # a LAION JPEG is ~100-200 kB
    return max(1 << 20, int(0.8 * rows * per_sample))


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
