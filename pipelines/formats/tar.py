"""Readers for the inputs: img2dataset-style webdataset tars and LAION metadata parquet.

A tar is read as a stream (nothing is seeked, so http:// and s3:// stream too) and its members are
grouped into samples the webdataset way: ``dir/KEY.ext`` -> key ``dir/KEY``, extension everything
after the first dot of the file name, lower-cased. Keys are data, never used as file paths.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from shardsmith.pipelines.core import fs as fsutil

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class Sample:
    row: int  # position of the sample in its shard, 0-based
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes
    infos: list[tarfile.TarInfo] = field(default_factory=list)  # original headers, in order
    error_kind: str | None = None
    error: str | None = None

    @property
    def image_ext(self) -> str | None:
        for ext in IMAGE_EXTS:
            if ext in self.members:
                return ext
        return None

    @property
    def image(self) -> bytes | None:
        ext = self.image_ext
        return self.members[ext] if ext else None

    def caption(self) -> str | None:
        raw = self.members.get("txt")
        if raw is None:
            return None
        return raw.decode("utf-8", errors="replace")


def split_member_name(name: str) -> tuple[str, str] | None:
    m = _KEY_EXT.match(name)
    if not m:
        return None
    return m.group(1), m.group(2).lower()


def iter_tar_samples(url: str) -> Iterator[Sample]:
    """Samples of a webdataset tar, in file order, as a stream.

    Duplicate keys (a key seen before in this tar) and samples without an image come out as
    samples with ``error_kind`` set; a tar that ends mid-member yields one last error sample
    (``truncated_tar``) after the complete samples before it.
    """
    seen: set[str] = set()
    current: Sample | None = None
    row = 0

    def finish(s: Sample) -> Sample:
        if s.error_kind is None:
            if s.key.startswith("/") or ".." in s.key.split("/"):
                s.error_kind, s.error = "unsafe_key", f"key {s.key!r} is an absolute path or climbs out with '..'"
            elif s.key in seen:
                s.error_kind, s.error = "duplicate_key", f"key {s.key!r} appears more than once in this tar"
            elif s.image_ext is None:
                have = ", ".join(sorted(s.members)) or "nothing"
                s.error_kind, s.error = "missing_image", f"sample has no image member (has: {have})"
        seen.add(s.key)
        return s

    try:
        with fsutil.open_file(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                parts = split_member_name(info.name)
                if parts is None:
                    continue  # e.g. a README without an extension: not a sample member
                key, ext = parts
                if current is None or key != current.key:
                    if current is not None:
                        yield finish(current)
                        row += 1
                    current = Sample(row=row, key=key)
                data = tar.extractfile(info).read()
                if ext in current.members:
                    current.error_kind = "duplicate_key"
                    current.error = f"key {key!r} has two '{ext}' members"
                current.members[ext] = data
                current.infos.append(info)
    except (tarfile.ReadError, EOFError, OSError) as e:
        if current is not None:
            # The last sample may be incomplete: it is reported, not scored.
            current.error_kind = "truncated_tar"
            current.error = f"tar is truncated or corrupt inside this sample: {type(e).__name__}: {e}"
            yield finish(current)
            return
        if row == 0 and "empty file" in str(e):
            return  # a 0-byte tar is an empty shard
        yield Sample(row=row, key=f"__tar_error_{row}", error_kind="truncated_tar",
                     error=f"tar is truncated or corrupt after {row} samples: {type(e).__name__}: {e}")
        return
    if current is not None:
        yield finish(current)


def read_index_parquet(url: str) -> pa.Table | None:
    """The img2dataset parquet index beside a tar, if there is one."""
    if not fsutil.exists(url):
        return None
    with fsutil.open_file(url, "rb") as f:
        return pq.read_table(f, use_threads=False)


# LAION metadata: canonical column -> accepted spellings (compared case-insensitively).
LAION_COLUMNS = {
    "url": ("url",),
    "caption": ("text", "caption"),
    "original_width": ("width", "original_width"),
    "original_height": ("height", "original_height"),
    "similarity": ("similarity",),
    "punsafe": ("punsafe",),
    "pwatermark": ("pwatermark",),
    "aesthetic": ("aesthetic_score", "aesthetic"),
    "key": ("sample_id", "key"),
    "license": ("license",),
    "nsfw": ("nsfw",),
    "hash": ("hash",),
}


def metadata_column_map(names: list[str]) -> dict[str, str]:
    """canonical name -> the file's own column name, for the LAION columns the file has."""
    lower = {}
    for n in names:
        lower.setdefault(n.lower(), n)
    out = {}
    for canon, spellings in LAION_COLUMNS.items():
        for s in spellings:
            if s in lower:
                out[canon] = lower[s]
                break
    return out


def metadata_schema(url: str) -> pa.Schema:
    with fsutil.open_file(url, "rb") as f:
        return pq.ParquetFile(f).schema_arrow


def iter_metadata_batches(url: str, batch_rows: int = 65536) -> Iterator[pa.RecordBatch]:
    with fsutil.open_file(url, "rb") as f:
        pf = pq.ParquetFile(f)
        yield from pf.iter_batches(batch_size=batch_rows)
