"""The download stage of ``curate --mode urls`` (and of ``shardsmith download``): LAION metadata
rows -> an img2dataset-layout shard, every row with its fate.

Reads one row per URL shard (``shard``); in curate it is the read stage and writes SAMPLE columns
(``stages/batch.py``) by streaming the downloaded tar. Resources: a fraction of a CPU per task
(the work is waiting on the network), ``fetch_threads`` threads in it.

Per shard (a LAION parquet file, or a slice of ``urls_per_shard`` rows of a large one):

1. the metadata-only rules run first -- the configured rules whose fields the metadata has
   (``similarity``, ``punsafe``, ``pwatermark``, ``aesthetic`` from LAION's columns, ``min_side``
   from WIDTH/HEIGHT, ``has caption`` ...): a row they reject is never fetched (``skipped``, with
   the rule). A row whose metadata value is missing is fetched, and judged on the image;
2. the other rows are fetched by a thread pool (``formats/fetch.py``), in a bounded window so that
   memory holds a few dozen images, not a shard; optional resize at download time;
3. ``DEST/NAME.tar`` (``KEY.jpg|png|webp`` + ``KEY.txt`` + ``KEY.json``) and ``DEST/NAME.parquet``
   (every row: img2dataset's columns + ``reason, http_status, attempts, source_row``) are written
   under temporary names and moved into place, the parquet last: it is the download's completion
   marker, and records the tar's size, so a tar replaced by a later, interrupted retry is noticed.

In curate, the images pipeline then reads ``DEST/NAME.tar`` like any webdataset shard (same read,
decode, score, writer), and the writer merges the parquet's rows without a sample as dropped or
error rows (``formats/img2dataset.py``), so every input row lands in ``scores/NAME.parquet`` once.

Rerunning reuses a complete download (resume); with ``retry_kinds`` (``--retry-failed``) it
re-fetches only the rows that failed with those kinds, keeps everything else as it was, and
rewrites the shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import ExifTags, Image

from shardsmith.filters.rules import RuleSet, field_values
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.formats.fetch import Fetcher, FetchOptions, FetchResult
from shardsmith.pipelines.formats.img2dataset import INDEX_SCHEMA, META_KEY
from shardsmith.pipelines.formats.inputs import InputShard, UrlShard, sample_key
from shardsmith.pipelines.formats.laion import canonical_batch, metadata_column_map
from shardsmith.pipelines.formats.scores import SCORES_SCHEMA
from shardsmith.pipelines.formats.tar import PIL_FORMATS, TarWriter, iter_tar_samples

DOWNLOADED_DIR = "downloaded"
# Pillow format -> the extension stored (formats/tar.py IMAGE_EXTS); others are re-encoded as PNG.
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(frozen=True)
class DownloadOptions:
    fetch: FetchOptions = field(default_factory=FetchOptions)
    threads: int = 16
    resize_max_side: int = 0  # 0: store the bytes as downloaded
    retry_kinds: tuple[str, ...] = ()  # non-empty: re-fetch an existing download's failures of these kinds

    @classmethod
    def from_config(cls, cfg) -> "DownloadOptions":
        """From a CurateConfig (``retry_kinds`` only with ``retry_failed``)."""
        fetch = FetchOptions(connect_timeout=cfg.fetch_timeout, read_timeout=cfg.fetch_timeout,
                             deadline=cfg.fetch_deadline, max_bytes=cfg.fetch_max_bytes,
                             max_redirects=cfg.fetch_max_redirects, retries=cfg.fetch_retries,
                             user_agent=cfg.user_agent, opt_out_directives=tuple(cfg.opt_out_directives),
                             max_pixels=cfg.max_image_pixels, pool_size=cfg.fetch_threads,
                             allow_private_addresses=cfg.allow_private_addresses)
        return cls(fetch=fetch, threads=cfg.fetch_threads, resize_max_side=cfg.resize_max_side,
                   retry_kinds=tuple(cfg.retry_kinds) if cfg.retry_failed else ())


def download_paths(dest: str, name: str) -> tuple[str, str]:
    return fsutil.join(dest, f"{name}.tar"), fsutil.join(dest, f"{name}.parquet")


def as_input_shard(dest: str, name: str) -> InputShard:
    """The downloaded shard, as the images pipeline reads it."""
    tar_url, index_url = download_paths(dest, name)
    return InputShard(name, tar_url, "tar", index_url)


# ---------------------------------------------------------------------------------------------
# Reading the metadata and the metadata-only rules
# ---------------------------------------------------------------------------------------------

def read_metadata_rows(shard: UrlShard) -> tuple[pa.Table, set[str]]:
    """Rows ``start:stop`` under shardsmith's names (scores schema), and the canonical columns the
    file really has (the others are null)."""
    with fsutil.open_file(shard.url) as f:
        pf = pq.ParquetFile(f)
        cmap = metadata_column_map(pf.schema_arrow.names)
        columns = sorted(set(cmap.values()))
        groups, first, offset = [], None, 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n > shard.start and offset < shard.stop:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if groups:
            table = pf.read_row_groups(groups, columns=columns)
            table = table.slice(shard.start - first, shard.stop - shard.start)
        else:
            table = pf.schema_arrow.empty_table().select(columns)
    return canonical_batch(table, cmap, shard.start, SCORES_SCHEMA), set(cmap)


def metadata_rules(rules: RuleSet, available: set[str]) -> RuleSet:
    """The rules the metadata alone can decide: every field they read is a column of the file."""
    return RuleSet([r for r in rules.rules if r.needs() <= available])


def prefilter(meta: pa.Table, rules: RuleSet) -> list[tuple[str, str] | None]:
    """Per row: None (fetch it) or (rule, message) -- the first rule, in order, that the row's
    metadata value fails. A missing or out-of-range metadata value rejects nothing."""
    n = meta.num_rows
    out: list[tuple[str, str] | None] = [None] * n
    undecided = np.ones(n, dtype=bool)
    for rule in rules.rules:
        d = RuleSet([rule]).apply(meta)
        drop = undecided & (d.status == "dropped")
        if drop.any():
            shown = _shown_values(meta, rule)
            for i in np.flatnonzero(drop):
                out[i] = (rule.name, f"rejected before download by rule '{rule.name}' on the metadata{shown(i)}")
        undecided &= ~drop
    return out


def _shown_values(meta: pa.Table, rule):
    if rule.op == "has":
        return lambda i: f" ({rule.field} is empty)"
    vals = field_values(meta, rule.field)
    return lambda i: f" ({rule.field}={vals[i]:g})"


# ---------------------------------------------------------------------------------------------
# Fetching and preparing one image
# ---------------------------------------------------------------------------------------------

@dataclass
class Fetched:
    """A row's download outcome, ready to be written."""

    result: FetchResult
    data: bytes | None = None  # the bytes stored in the tar
    ext: str | None = None
    width: int | None = None  # stored, as displayed
    height: int | None = None
    original_width: int | None = None  # as downloaded, as displayed
    original_height: int | None = None
    exif: str | None = None
    sha256: str | None = None

    @property
    def ok(self) -> bool:
        return self.result.ok and self.data is not None


def prepare(result: FetchResult, resize_max_side: int) -> Fetched:
    """Sizes, EXIF and the bytes to store; with ``resize_max_side`` a larger image is downscaled
    (aspect kept, EXIF kept) and re-encoded in its own format (JPEG/WebP quality 95). Formats the
    readers do not know as an extension are stored as PNG."""
    if not result.ok:
        return Fetched(result)
    data = result.data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            exif = img.getexif()
            orientation = exif.get(0x0112, 1) if exif else 1
            ow, oh = img.size
            fmt = img.format or "unknown"
            ext = FORMAT_EXT.get(fmt)
            stored, sw, sh = data, ow, oh
            if ext is None or (resize_max_side and max(ow, oh) > resize_max_side):
                raw_exif = img.info.get("exif")
                if resize_max_side and max(ow, oh) > resize_max_side:
                    img.thumbnail((resize_max_side, resize_max_side), Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                kw = {"exif": raw_exif} if raw_exif else {}
                if ext == "jpg":
                    img = img if img.mode in ("RGB", "L", "CMYK") else img.convert("RGB")
                    img.save(buf, format="JPEG", quality=95, **kw)
                elif ext == "webp":
                    img.save(buf, format="WEBP", quality=95, **kw)
                else:
                    ext = "png"
                    img = img if img.mode in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA") else img.convert("RGBA")
                    img.save(buf, format="PNG", **kw)
                stored, (sw, sh) = buf.getvalue(), img.size
    except Exception as e:
        result.kind, result.message = "not_an_image", f"cannot prepare the image: {type(e).__name__}: {e}"
        return Fetched(result)
    if orientation in _SWAPPING_ORIENTATIONS:  # sizes as displayed, like the decode step reports them
        ow, oh, sw, sh = oh, ow, sh, sw
    return Fetched(result, stored, ext, sw, sh, ow, oh, _exif_json(exif), hashlib.sha256(data).hexdigest())


def _exif_json(exif) -> str:
    tags = {}
    for tag, value in (exif or {}).items():
        if isinstance(value, bytes):
            continue
        tags[str(ExifTags.TAGS.get(tag, tag))] = str(value)[:200]
    return json.dumps(tags, sort_keys=True)


def fetch_in_order(items: list[tuple[int, str]], options: DownloadOptions) -> Iterator[tuple[int, Fetched]]:
    """(row, Fetched) in the order of ``items``, fetched ``threads`` at a time; at most
    2 x threads results are held at once."""
    if not items:
        return
    with Fetcher(options.fetch) as fetcher:
        pool = ThreadPoolExecutor(options.threads, "shardsmith-fetch")

        def job(url: str) -> Fetched:
            return prepare(fetcher.fetch(url), options.resize_max_side)

        try:
            pending: deque = deque()
            queue = iter(items)
            for row, url in queue:
                pending.append((row, pool.submit(job, url)))
                if len(pending) >= 2 * options.threads:
                    break
            while pending:
                row, fut = pending.popleft()
                for nrow, url in queue:
                    pending.append((nrow, pool.submit(job, url)))
                    break
                yield row, fut.result()
        finally:  # also when the consumer stops early: queued fetches are cancelled, not run
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------

def read_download(dest: str, shard: UrlShard) -> pa.Table | None:
    """A complete earlier download of ``shard``: its index, when it exists and matches its tar."""
    tar_url, index_url = download_paths(dest, shard.name)
    if not fsutil.exists(index_url) or not fsutil.exists(tar_url):
        return None
    with fsutil.open_file(index_url) as f:
        index = pq.read_table(f, use_threads=False)
    info = json.loads((index.schema.metadata or {}).get(META_KEY, b"{}"))
    if (info.get("tar_size") != fsutil.size(tar_url) or info.get("source") != shard.url
            or [info.get("start"), info.get("stop")] != [shard.start, shard.stop]):
        return None  # a retry replaced the tar and was interrupted before its index: redo
    return index


def failed_rows(index: pa.Table, kinds: tuple[str, ...]) -> list[int]:
    status = index.column("status").to_pylist()
    reason = index.column("reason").to_pylist()
    return [i for i, (s, r) in enumerate(zip(status, reason)) if s == "failed_to_download" and r in kinds]


def download_shard(shard: UrlShard, dest: str, tmp_dir: str, rules: RuleSet, options: DownloadOptions,
                   per_shard: int) -> dict:
    """Download one shard into ``dest`` (see the module docstring); returns a summary dict."""
    t0 = time.time()
    earlier = read_download(dest, shard)
    if earlier is not None and not options.retry_kinds:
        return _summary(shard, earlier, fetched=0, seconds=time.time() - t0, reused=True)
    if earlier is not None:
        todo = failed_rows(earlier, options.retry_kinds)
        if not todo:
            return _summary(shard, earlier, fetched=0, seconds=time.time() - t0, reused=True)
        records = earlier.to_pylist()
        fetch_items = [(i, records[i]["url"]) for i in todo]
    else:
        meta, available = read_metadata_rows(shard)
        decisions = prefilter(meta, metadata_rules(rules, available))
        urls = meta.column("url").to_pylist()
        captions = meta.column("caption").to_pylist()
        widths = meta.column("original_width").to_pylist()
        heights = meta.column("original_height").to_pylist()
        records, fetch_items = [], []
        for i in range(meta.num_rows):
            rec = _record(sample_key(shard, i, per_shard), urls[i], captions[i], shard.start + i)
            if decisions[i] is not None:
                rec.update(status="skipped", reason=decisions[i][0], error_message=decisions[i][1],
                           original_width=widths[i], original_height=heights[i])
            else:
                fetch_items.append((i, urls[i]))
            records.append(rec)
    tar_url, index_url = download_paths(dest, shard.name)
    results = fetch_in_order(fetch_items, options)
    previous = iter_tar_samples(tar_url) if earlier is not None else iter(())
    try:
        with fsutil.atomic_write(tar_url, tmp_dir=tmp_dir) as f, TarWriter(f) as tar:
            _write_samples(tar, tar_url, records, {i for i, _ in fetch_items}, results, previous)
    finally:
        results.close()  # stops the thread pool if writing failed
        if hasattr(previous, "close"):
            previous.close()
    info = {"source": shard.url, "start": shard.start, "stop": shard.stop, "tar_size": fsutil.size(tar_url),
            "resize_max_side": options.resize_max_side}
    index = pa.Table.from_pylist(records, schema=INDEX_SCHEMA).replace_schema_metadata(
        {META_KEY: json.dumps(info).encode()})
    with fsutil.atomic_write(index_url, tmp_dir=tmp_dir) as f:
        pq.write_table(index, f, compression="zstd")
    return _summary(shard, index, fetched=len(fetch_items), seconds=time.time() - t0, reused=False)


def _write_samples(tar, tar_url: str, records: list[dict], fetched_rows: set[int], results, previous) -> None:
    """Every row in order: fetched rows from ``results`` (same order), earlier successes copied
    from the earlier tar (``previous``), the others have no sample."""
    nxt = next(results, None)
    for i, rec in enumerate(records):
        if i in fetched_rows:
            row, item = nxt
            assert row == i, (row, i)
            nxt = next(results, None)
            _apply(rec, item)
            if item.ok:
                _add_sample(tar, rec, item.ext, item.data)
        elif rec["status"] == "success":  # kept from the earlier download, bytes untouched
            sample = next(previous, None)
            if sample is None or sample.key != rec["key"] or sample.image_ext is None:
                raise RuntimeError(f"{tar_url}: the tar does not hold {rec['key']!r} where its index says; "
                                   "remove the shard's downloaded files and rerun to download it again")
            _add_sample(tar, rec, sample.image_ext, sample.image)


def _record(key: str, url, caption, source_row: int) -> dict:
    return {"key": key, "url": url, "caption": caption, "status": None, "error_message": None, "width": None,
            "height": None, "original_width": None, "original_height": None, "exif": None, "sha256": None,
            "reason": None, "http_status": None, "attempts": 0, "source_row": source_row}


def _apply(rec: dict, item: Fetched) -> None:
    r = item.result
    rec.update(http_status=r.http_status, attempts=(rec.get("attempts") or 0) + r.attempts)
    if item.ok:
        rec.update(status="success", error_message=None, reason=None, width=item.width, height=item.height,
                   original_width=item.original_width, original_height=item.original_height, exif=item.exif,
                   sha256=item.sha256)
    else:
        rec.update(status="failed_to_download", error_message=r.message, reason=r.kind)


def _add_sample(tar: TarWriter, rec: dict, ext: str, data: bytes) -> None:
    meta = {k: rec[k] for k in ("key", "url", "caption", "status", "error_message", "width", "height",
                                "original_width", "original_height", "exif", "sha256", "source_row")}
    tar.add_sample(rec["key"], {ext: data, "txt": (rec["caption"] or "").encode(), "json": json.dumps(meta).encode()})


def _summary(shard: UrlShard, index: pa.Table, fetched: int, seconds: float, reused: bool) -> dict:
    status = index.column("status").to_pylist()
    reason = index.column("reason").to_pylist()
    return {"shard": shard.name, "rows": index.num_rows, "success": status.count("success"),
            "skipped": status.count("skipped"), "failed": status.count("failed_to_download"),
            "failed_by_kind": dict(Counter(r for s, r in zip(status, reason) if s == "failed_to_download")),
            "fetched_now": fetched, "reused": reused, "seconds": round(seconds, 3)}


# ---------------------------------------------------------------------------------------------
# On Ray: the download step as the read stage of curate
# ---------------------------------------------------------------------------------------------

def download_and_read(batch: dict, url_shards: dict, dest: str, tmp_dir: str, rules: RuleSet,
                      options: DownloadOptions, per_shard: int, rows_per_batch: int | None = None) -> Iterator[dict]:
    """Ray Data UDF, curate's read stage in urls mode: download a shard (or reuse its complete
    download), then stream its tar exactly as images mode streams an input tar."""
    from shardsmith.pipelines.stages.read import read_shard_rows

    for name in batch["shard"]:
        shard = url_shards[str(name)]
        download_shard(shard, dest, tmp_dir, rules, options, per_shard)
        tar_url, _ = download_paths(dest, shard.name)
        rows = {"shard": [shard.name], "url": [tar_url]}
        yield from read_shard_rows(rows, rows_per_batch) if rows_per_batch else read_shard_rows(rows)


