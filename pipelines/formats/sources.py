"""Where a generation row's files come from: source images, masks, control images (a path, an
fsspec URL, or a key of an input webdataset), LoRA and textual-inversion files.

- Relative paths in a prompt table are relative to the table's folder (``resolve``); run-wide
  defaults given on the command line are made absolute by the CLI.
- A webdataset is indexed once at plan time (``index_images``: each key's image member, its byte
  offset and size in its tar, read from the tar headers); the actor then reads only that byte
  range (``read_source``), locally or through fsspec.
- Every file's bytes are hashed where they are read (``sha256``), so that KEY.json records the
  sha256 of exactly what went into the image.
"""

from __future__ import annotations

import hashlib
import os
import tarfile

from shardsmith.errors import InputError
from shardsmith.pipelines.core import fs as fsutil


class SourceError(ValueError):
    """A row's file that cannot be read (an error row, not a failed run)."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_url(value: str) -> bool:
    return "://" in value


def resolve(value: str, base: str | None) -> str:
    """``value`` as an absolute path or URL: a URL or an absolute path is kept, a relative path
    is joined to ``base`` (the prompt table's folder)."""
    if is_url(value) or os.path.isabs(value) or not base:
        return value
    if is_url(base):
        return fsutil.join(base, value)
    return os.path.normpath(os.path.join(base, value))


def table_folder(url: str) -> str:
    """The folder of a prompt table URL (what its relative paths are relative to)."""
    if is_url(url):
        return url.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(url))


def index_images(spec: str) -> dict[str, dict | None]:
    """key -> {"url", "member", "offset", "size"} of each sample's image in the webdataset ``spec``
    (shards as every job reads them: a folder, a glob, a brace pattern, fsspec URLs). A key found in
    two shards maps to None (ambiguous: rows naming it become error rows)."""
    from shardsmith.pipelines.formats.inputs import plan_shards
    from shardsmith.pipelines.formats.tar import IMAGE_EXTS, split_member_name

    _, shards = plan_shards(spec, "images")
    index: dict[str, dict | None] = {}
    for s in shards:
        found: dict[str, tuple[int, dict]] = {}
        try:
            with fsutil.open_file(s.url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    parts = split_member_name(info.name) if info.isfile() else None
                    if not parts or parts[1] not in IMAGE_EXTS:
                        continue
                    key, ext = parts
                    rank = IMAGE_EXTS.index(ext)
                    if key not in found or rank < found[key][0]:
                        found[key] = (rank, {"url": s.url, "member": info.name, "offset": info.offset_data,
                                             "size": info.size})
        except (tarfile.TarError, OSError) as e:
            raise InputError(f"{s.url}: cannot index the images of this tar: {type(e).__name__}: {e}") from e
        for key, (_, ref) in found.items():
            index[key] = None if key in index else ref
    return index


def read_file(url: str, what: str) -> bytes:
    try:
        with fsutil.open_file(url, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise SourceError(f"{what} {url!r}: file not found") from e
    except (OSError, ValueError) as e:
        raise SourceError(f"{what} {url!r}: cannot read it: {type(e).__name__}: {e}") from e


def read_source(path: str | None, ref: dict | None, what: str = "image") -> bytes:
    """The bytes of a row's image: the byte range ``ref`` of a webdataset tar, or the file ``path``."""
    if ref is None:
        return read_file(path, what)
    if "offset" not in ref:  # {"url": tar, "key": key}: augment's source sample, found by reading the tar
        from shardsmith.pipelines.formats.tar import iter_tar_samples

        for sample in iter_tar_samples(ref["url"]):
            if sample.key == ref["key"] and sample.image is not None:
                return sample.image
        raise SourceError(f"{what} {ref['key']!r}: not in {ref['url']}")
    try:
        with fsutil.open_file(ref["url"], "rb") as f:
            f.seek(ref["offset"])
            data = f.read(ref["size"])
    except (OSError, ValueError) as e:
        raise SourceError(f"{what} {path!r} ({ref['url']}): cannot read it: {type(e).__name__}: {e}") from e
    if len(data) != ref["size"]:
        raise SourceError(f"{what} {path!r}: {ref['url']} ends before its member {ref['member']}")
    return data
