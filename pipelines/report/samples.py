"""Finding the original image of a row of a finished run, for the report's thumbnails and for
``shardsmith inspect --write-image``.

A kept sample is in ``OUTPUT/curated/<shard>.tar``; a dropped or error sample only in the input
tar that ``manifest.json`` names (the run does not copy it). Both tars are read as streams through
fsspec, so s3:// and http:// inputs work, and an input tar is read only up to the last row wanted.
A row that cannot be found comes back with the reason, never as an exception: a report of a run
whose inputs have since moved still renders.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.formats.tar import iter_tar_samples


@dataclass(frozen=True)
class Wanted:
    """A row whose image is wanted."""

    shard: str
    row: int
    key: str
    status: str


@dataclass
class FoundImage:
    ext: str | None = None  # image member extension (jpg, png, ...)
    data: bytes | None = None
    problem: str | None = None  # why there are no bytes
    source: str | None = None  # the tar the bytes came from


def input_tars(manifest: dict) -> dict[str, str]:
    """shard name -> input tar URL, from the run manifest."""
    return {i["name"]: i["url"] for i in manifest.get("inputs", []) if i.get("kind") == "tar"}


def curated_tar(output: str, shard: str) -> str:
    return fsutil.join(output, "curated", f"{shard}.tar")


def _from_sample(sample, url: str) -> FoundImage:
    if sample.image is None:
        reason = sample.error or "sample has no image member"
        return FoundImage(problem=reason, source=url)
    return FoundImage(ext=sample.image_ext, data=sample.image, source=url)


def read_rows(url: str, rows: dict[int, str]) -> dict[int, FoundImage]:
    """Images of the given rows (row -> expected key) of a tar, read up to the last row needed.

    A row whose key differs from the expected one means the tar changed since the run: reported,
    not shown, since the picture would belong to another sample."""
    out: dict[int, FoundImage] = {}
    if not rows:
        return out
    last = max(rows)
    try:
        for sample in iter_tar_samples(url):
            if sample.row > last:
                break
            if sample.row not in rows:
                continue
            if sample.key != rows[sample.row]:
                out[sample.row] = FoundImage(problem=f"row {sample.row} of {url} has key {sample.key!r}, "
                                                     f"not {rows[sample.row]!r}: the tar changed since the run")
            else:
                out[sample.row] = _from_sample(sample, url)
    except Exception as e:  # unreachable or unreadable input: every wanted row says why
        problem = f"cannot read {url}: {type(e).__name__}: {e}"
        return {r: out.get(r) or FoundImage(problem=problem) for r in rows}
    for r in rows:
        out.setdefault(r, FoundImage(problem=f"{url} has no row {r}"))
    return out


def read_keys(url: str, keys: set[str]) -> dict[str, FoundImage]:
    """Images of the given keys of a tar (a curated tar holds only the kept rows, so rows differ)."""
    out: dict[str, FoundImage] = {}
    if not keys:
        return out
    try:
        for sample in iter_tar_samples(url):
            if sample.key in keys and sample.key not in out:
                out[sample.key] = _from_sample(sample, url)
                if len(out) == len(keys):
                    break
    except Exception as e:
        problem = f"cannot read {url}: {type(e).__name__}: {e}"
        return {k: out.get(k) or FoundImage(problem=problem) for k in keys}
    for k in keys:
        out.setdefault(k, FoundImage(problem=f"{url} has no sample {k!r}"))
    return out


def fetch_images(output: str, manifest: dict, wanted: list[Wanted]) -> dict[tuple[str, int], FoundImage]:
    """(shard, row) -> image, for rows of a curate run: kept rows from the curated tar, the others
    (and kept rows the curated tar cannot give) from the input tar."""
    inputs = input_tars(manifest)
    by_shard: dict[str, list[Wanted]] = {}
    for w in wanted:
        by_shard.setdefault(w.shard, []).append(w)
    out: dict[tuple[str, int], FoundImage] = {}
    for shard, items in sorted(by_shard.items()):
        kept = {w.key: w for w in items if w.status == "kept"}
        found_kept = read_keys(curated_tar(output, shard), set(kept))
        rest: dict[int, str] = {}
        for w in items:
            img = found_kept.get(w.key) if w.status == "kept" else None
            if img is not None and img.data is not None:
                out[(shard, w.row)] = img
            else:
                rest[w.row] = w.key
        if not rest:
            continue
        url = inputs.get(shard)
        if url is None:
            for row in rest:
                out[(shard, row)] = FoundImage(problem=f"manifest.json names no input tar for shard {shard}")
            continue
        for row, img in read_rows(url, rest).items():
            out[(shard, row)] = img
    return out
