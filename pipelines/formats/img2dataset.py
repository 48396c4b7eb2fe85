"""img2dataset's parquet index beside a tar, read the way curate needs it.

An img2dataset shard's ``NNNNN.parquet`` lists every input row it was given -- also the ones with
no sample in the tar (``status`` ``failed_to_download``, ``failed_to_resize``, and shardsmith's own
``skipped``, for rows the metadata rules rejected before any fetch). Those rows were read too, so
they belong in the scores with a status: ``merge_index_rows`` adds them (errors with their kind, or
dropped with the rule that skipped them), which keeps ``kept + dropped + errors == rows_read``
true of the *input rows*, not only of the images that arrived.

The index also knows the size an image had before a download-time resize
(``original_width/height``); ``original_sizes_from_index`` puts it back, so that a rule such as
``min_side >= 512`` judges the original image, as LAION's and Stable Diffusion's filters mean it.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardsmith.pipelines.core import fs as fsutil

# The columns shardsmith's download step writes: img2dataset's own, then its additions.
INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("status", pa.string()),  # success | skipped | failed_to_download
    ("error_message", pa.string()),
    ("width", pa.int64()),  # stored image, as displayed (EXIF orientation applied)
    ("height", pa.int64()),
    ("original_width", pa.int64()),  # before the download-time resize
    ("original_height", pa.int64()),
    ("exif", pa.string()),
    ("sha256", pa.string()),  # of the bytes as downloaded
    ("reason", pa.string()),  # shardsmith: error kind (failed) or rule (skipped)
    ("http_status", pa.int64()),
    ("attempts", pa.int64()),
    ("source_row", pa.int64()),  # row of the metadata parquet this came from
])
META_KEY = b"shardsmith.download"
# Index statuses of input rows that have no sample: img2dataset's, the download step's
# ``skipped``, and "error": a shardsmith generate/augment row that produced no image.
NO_SAMPLE_STATUSES = ("failed_to_download", "failed_to_resize", "skipped", "error")

def read_index_parquet(url: str) -> pa.Table | None:
    """The img2dataset parquet index beside a tar, if there is one."""
    if not fsutil.exists(url):
        return None
    with fsutil.open_file(url, "rb") as f:
        return pq.read_table(f, use_threads=False)



_HTTP_CODE = re.compile(r"(?:HTTP Error |HTTP |status code )(\d{3})|\b(\d{3}) (?:Client|Server) Error", re.I)


def failure_kind(status: str, message: str | None) -> str:
    """An error kind for an index row that has no ``reason``: shardsmith generate/augment's
    ``error`` rows are ``generation_error`` (their own stats' kind); img2dataset's failures are
    read from the ``error_message`` where it is recognisable, else the status itself."""
    if status == "error":
        return "generation_error"
    msg = message or ""
    m = _HTTP_CODE.search(msg)
    if m:
        code = int(m.group(1) or m.group(2))
        return "http_5xx" if code >= 500 else f"http_{code}"
    low = msg.lower()
    if "timed out" in low or "timeout" in low:
        return "timeout"
    if "x-robots-tag" in low or "noai" in low:
        return "opted_out"
    if "cannot identify image" in low or "truncated" in low or "decod" in low:
        return "not_an_image"
    if any(w in low for w in ("connection", "refused", "reset", "name or service", "ssl", "certificate")):
        return "connection_error"
    return status or "failed_to_download"


def _strings(table: pa.Table, name: str) -> list:
    if name not in table.column_names:
        return [None] * table.num_rows
    return [None if v is None else str(v) for v in table.column(name).to_pylist()]


def _ints(table: pa.Table, name: str) -> list:
    if name not in table.column_names:
        return [None] * table.num_rows
    out = []
    for v in table.column(name).to_pylist():
        try:
            out.append(None if v is None or v != v else int(v))
        except (TypeError, ValueError):
            out.append(None)
    return out


def original_sizes_from_index(results: pa.Table, index: pa.Table | None) -> pa.Table:
    """Results whose decoded size is the index's stored ``width x height`` take the index's
    ``original_width x original_height`` (the size before a download-time resize)."""
    need = ("key", "width", "height", "original_width", "original_height")
    if index is None or results.num_rows == 0 or any(c not in index.column_names for c in need):
        return results
    stored = {}
    for k, w, h, ow, oh in zip(_strings(index, "key"), _ints(index, "width"), _ints(index, "height"),
                               _ints(index, "original_width"), _ints(index, "original_height")):
        if k is not None and None not in (w, h, ow, oh) and (w, h) != (ow, oh):
            stored.setdefault(k, (w, h, ow, oh))
    if not stored:
        return results
    widths = results.column("original_width").to_pylist()
    heights = results.column("original_height").to_pylist()
    changed = False
    for i, k in enumerate(results.column("key").to_pylist()):
        if k not in stored or widths[i] is None:
            continue
        w, h, ow, oh = stored[k]
        if (widths[i], heights[i]) == (w, h):
            widths[i], heights[i], changed = ow, oh, True
        elif (widths[i], heights[i]) == (h, w):  # decoded with the other orientation convention
            widths[i], heights[i], changed = oh, ow, True
    if not changed:
        return results
    wt = results.schema.field("original_width").type
    ht = results.schema.field("original_height").type
    results = results.set_column(results.column_names.index("original_width"), "original_width", pa.array(widths, wt))
    return results.set_column(results.column_names.index("original_height"), "original_height", pa.array(heights, ht))


def sha256_from_index(results: pa.Table, index: pa.Table | None) -> pa.Table:
    """Results whose key has a ``sha256`` in the index take it (img2dataset's own hash of the bytes
    as downloaded, also where a download-time resize changed the stored bytes); the others keep
    the hash decode computed of the stored bytes."""
    if index is None or results.num_rows == 0 or "sha256" not in results.column_names \
            or not {"key", "sha256"} <= set(index.column_names):
        return results
    known = {}
    for k, h in zip(_strings(index, "key"), _strings(index, "sha256")):
        if k is not None and h:
            known.setdefault(k, h.lower())
    if not known:
        return results
    hashes = [known.get(k, h) for k, h in zip(results.column("key").to_pylist(), results.column("sha256").to_pylist())]
    return results.set_column(results.column_names.index("sha256"), "sha256", pa.array(hashes, pa.string()))


def merge_index_rows(scores: pa.Table, index: pa.Table | None) -> pa.Table:
    """``scores`` (the tar's samples, decided) plus one row per index row that has no sample and
    whose status says why (``NO_SAMPLE_STATUSES``): ``skipped`` -> dropped with the recorded rule,
    a failure -> error with its kind and message.

    Row numbers: a shardsmith download index lists every metadata row in order, so there a row's
    number is its index position (= its metadata row), when the index has every sample's key once.
    Otherwise (img2dataset's own index) samples keep their tar position -- what ``row`` means in
    images mode, and what the report uses to find an image -- and the added rows follow them."""
    if index is None or "key" not in index.column_names or "status" not in index.column_names:
        return scores
    keys = _strings(index, "key")
    status = _strings(index, "status")
    sample_keys = scores.column("key").to_pylist()
    scored = set(sample_keys)
    extra = [i for i, (k, s) in enumerate(zip(keys, status))
             if k is not None and s in NO_SAMPLE_STATUSES and k not in scored]
    if not extra:
        return scores
    messages, reasons = _strings(index, "error_message"), _strings(index, "reason")
    widths, heights = _ints(index, "original_width"), _ints(index, "original_height")
    captions, urls = _strings(index, "caption"), _strings(index, "url")
    position = {k: i for i, k in enumerate(keys)}
    by_index = (META_KEY in (index.schema.metadata or {}) and len(position) == len(keys)
                and None not in position and len(scored) == len(sample_keys)
                and all(k in position for k in sample_keys))
    n = scores.num_rows
    new_status, new_reason, new_error = [], [], []
    for i in extra:
        if status[i] == "skipped":
            new_status.append("dropped")
            new_reason.append(reasons[i] or "skipped")
            new_error.append(None)
        else:
            new_status.append("error")
            new_reason.append(reasons[i] or failure_kind(status[i], messages[i]))
            new_error.append(messages[i] or f"no sample: index status {status[i]!r}")
    cols = {}
    for f in scores.schema:
        values = {
            "key": [keys[i] for i in extra],
            "row": extra if by_index else list(range(n, n + len(extra))),
            "status": new_status, "reason": new_reason, "error": new_error,
            "original_width": [widths[i] for i in extra], "original_height": [heights[i] for i in extra],
            "caption": [captions[i] for i in extra], "url": [urls[i] for i in extra],
        }.get(f.name)
        cols[f.name] = pa.array(values, f.type) if values is not None else pa.nulls(len(extra), f.type)
    added = pa.table(cols, schema=scores.schema)
    if by_index:
        rows = pa.array([position[k] for k in sample_keys], scores.schema.field("row").type)
        scores = scores.set_column(scores.column_names.index("row"), "row", rows)
    merged = pa.concat_tables([scores, added]).sort_by("row")
    assert pc.count_distinct(merged.column("row")).as_py() == merged.num_rows, "row numbers must stay unique"
    return merged


def expected_rows(shards) -> int | None:
    """Rows to expect, from the img2dataset parquet indexes when every shard has one."""
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
