"""Input planning: turn INPUT into a checked list of shards before any work is scheduled.

INPUT is an fsspec URL: a directory, a file, a glob (``s3://b/laion/*.tar``) or a brace pattern
(``data/{00000..00009}.tar``); several may be given separated by commas. Each input file is a
shard, named after its file name without extension; its outputs carry the same name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

from shardsmith.errors import InputError
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.formats.laion import metadata_column_map, metadata_schema

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class InputShard:
    name: str
    url: str
    kind: str  # "tar" | "metadata"
    index_url: str | None = None  # img2dataset parquet beside a tar
    size: int | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "url": self.url, "kind": self.kind, "index_url": self.index_url}


def _stem(url: str) -> str:
    base = url.rstrip("/").rsplit("/", 1)[-1]
    stem = base.split(".", 1)[0] if not base.startswith(".") else base
    return _SAFE.sub("_", stem) or "shard"


def split_inputs(spec: str) -> list[str]:
    """Split 'a.tar,b/*.tar' on the commas that are not inside a {brace,pattern}."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def find_inputs(spec: str) -> list[str]:
    urls: list[str] = []
    for part in split_inputs(spec):
        try:
            if fsutil.isdir(part):
                files = fsutil.list_files(part, (".tar", ".parquet"))
                tars = [f for f in files if f.endswith(".tar")]
                urls.extend(tars if tars else files)
            else:
                found = fsutil.expand(part)
                urls.extend(found)
        except (InputError, FileNotFoundError):
            raise
        except Exception as e:  # no credentials, access denied, endpoint unreachable...
            raise InputError(f"{part}: cannot list input: {type(e).__name__}: {e}{_access_hint(part)}") from e
    return urls


def _access_hint(url: str) -> str:
    """Where object-store access comes from, for the error message (never the values)."""
    if url.startswith(("s3://", "s3a://")):
        return (" (s3:// credentials come from the environment: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or the instance role; a custom endpoint from AWS_ENDPOINT_URL_S3)")
    return ""


def _check_tar_header(url: str) -> int:
    try:
        size = fsutil.size(url)
    except FileNotFoundError as e:
        raise InputError(f"{url}: input file not found") from e
    except Exception as e:  # permission, network...
        raise InputError(f"{url}: cannot read input: {type(e).__name__}: {e}") from e
    if size == 0:
        return 0
    try:
        with fsutil.open_file(url, "rb") as f:
            head = f.read(512)
    except Exception as e:
        raise InputError(f"{url}: cannot read input: {type(e).__name__}: {e}") from e
    if head[:2] == b"\x1f\x8b":
        return size  # gzip-compressed tar; tarfile's r|* reads it
    if len(head) < 512 or (head[257:262] != b"ustar" and any(head)):
        raise InputError(f"{url}: not a tar archive (no ustar header in the first 512 bytes)")
    return size


def plan_shards(spec: str, mode: str = "auto", required_columns: set[str] | None = None) -> tuple[str, list[InputShard]]:
    """(mode, shards). Raises InputError naming the file for anything unreadable or missing."""
    urls = find_inputs(spec)
    if not urls:
        raise InputError(f"{spec}: no input files found (expected .tar shards or LAION .parquet metadata)")
    tars = [u for u in urls if u.endswith((".tar", ".tar.gz", ".tgz"))]
    parquets = [u for u in urls if u.endswith(".parquet")]
    others = [u for u in urls if u not in tars and u not in parquets]
    if others:
        raise InputError(f"{others[0]}: not a .tar shard or a .parquet metadata file")
    if mode == "auto":
        mode = "images" if tars else "metadata"
    shards: list[InputShard] = []
    if mode == "images":
        if not tars:
            raise InputError(f"{spec}: mode 'images' needs .tar shards, found only parquet files")
        for u in tars:
            idx = u.rsplit(".tar", 1)[0] + ".parquet"
            size = _check_tar_header(u)
            shards.append(InputShard(_stem(u), u, "tar", idx if fsutil.exists(idx) else None, size))
    else:
        if not parquets:
            raise InputError(f"{spec}: mode 'metadata' needs LAION .parquet files")
        for u in parquets:
            try:
                schema = metadata_schema(u)
            except FileNotFoundError as e:
                raise InputError(f"{u}: input file not found") from e
            except Exception as e:
                raise InputError(f"{u}: not a readable parquet file: {type(e).__name__}: {e}") from e
            check_metadata_columns(u, schema, required_columns or set())
            shards.append(InputShard(_stem(u), u, "metadata"))
    names = [s.name for s in shards]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        clash = [s.url for s in shards if s.name == dup[0]]
        raise InputError(f"two input shards would write the same outputs {dup[0]!r}: {clash[0]} and "
                         f"{clash[1]}; curate them into different OUTPUT folders")
    return mode, shards


def check_metadata_columns(url: str, schema: pa.Schema, required: set[str]) -> None:
    cmap = metadata_column_map(schema.names)
    for canon in sorted(required):
        if canon == "caption" and "caption" not in cmap:
            raise InputError(f"{url}: missing column 'TEXT' (the caption), needed by the rules")
        if canon not in cmap:
            from shardsmith.pipelines.formats.laion import LAION_COLUMNS

            spell = LAION_COLUMNS.get(canon, (canon,))[0].upper()
            raise InputError(f"{url}: missing column {spell!r} (any letter case), needed by the rules "
                             f"for {canon!r}; the file has: {', '.join(schema.names)}")
        if canon != "caption":
            t = schema.field(cmap[canon]).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)):
                raise InputError(f"{url}: column {cmap[canon]!r} has type {t}, expected numbers")


@dataclass(frozen=True)
class UrlShard:
    """Rows ``start:stop`` of a LAION metadata parquet file: the unit of download and commit."""

    name: str
    url: str
    start: int
    stop: int
    kind: str = "urls"
    index_url: str | None = None  # no index before the download (read by progress estimates)

    def to_dict(self) -> dict:
        return {"name": self.name, "url": self.url, "kind": self.kind, "rows": [self.start, self.stop]}


def plan_url_shards(spec: str, per_shard: int) -> list[UrlShard]:
    """The metadata files of INPUT, cut into shards of at most ``per_shard`` rows. A file that
    fits is one shard named after the file (``part-00000``); a larger one gives ``part-00000_00000``,
    ``part-00000_00001`` ... (the name is part of every key and output file)."""
    import pyarrow.parquet as pq

    _, files = plan_shards(spec, "urls")
    out: list[UrlShard] = []
    for f in files:
        try:
            with fsutil.open_file(f.url) as fh:
                pf = pq.ParquetFile(fh)
                n, names = pf.metadata.num_rows, pf.schema_arrow.names
        except Exception as e:
            raise InputError(f"{f.url}: not a readable parquet file: {type(e).__name__}: {e}") from e
        if "url" not in metadata_column_map(names):
            raise InputError(f"{f.url}: missing column 'URL' (any letter case), needed by --mode urls; the file "
                             f"has: {', '.join(names)}")
        if n <= per_shard:
            out.append(UrlShard(f.name, f.url, 0, n))
        else:
            for k, start in enumerate(range(0, n, per_shard)):
                out.append(UrlShard(f"{f.name}_{k:05d}", f.url, start, min(n, start + per_shard)))
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"two input shards would write the same outputs {dup[0]!r}; rename one of the files "
                         "or curate them into different OUTPUT folders")
    return out


def sample_key(shard: UrlShard, i: int, per_shard: int) -> str:
    """img2dataset-style key: shard name + zero-padded position (unique across the run)."""
    width = max(4, len(str(max(per_shard, shard.stop - shard.start) - 1)))
    return f"{shard.name}_{i:0{width}d}"
