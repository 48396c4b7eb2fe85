"""Webdataset tars: the reader every job uses, and the one tar writer.

A tar is read as a stream (nothing is seeked, so http:// and s3:// stream too) and its members are
grouped into samples the webdataset way: ``dir/KEY.ext`` -> key ``dir/KEY``, extension everything
after the first dot of the file name, lower-cased. Keys are data, never used as file paths. The
reader turns what a lenient reader would skip into error samples (a duplicate key, a sample with
no image, a truncated tar), so that every sample is accounted for.

``TarWriter`` writes every tar shardsmith makes (curated, generated, downloaded, sample data) with
one header convention: PAX format, mode 0644, mtime 0, uid/gid 0 and no user names, so that the
same samples give the same bytes. ``copy`` keeps a source member's header and bytes untouched (the
curated copy of a sample is the input's sample).
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass, field
from typing import IO, Iterator

from shardsmith.pipelines.core import fs as fsutil

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# The Pillow decoders for those extensions (JPEG's also opens MPO, a JPEG with a multi-picture
# index). Every ``Image.open`` of sample or fetched bytes passes ``formats=PIL_FORMATS``: a file
# that claims to be a JPEG but is an EPS (Ghostscript), a FLI or one of Pillow's ~40 other formats
# is not parsed at all.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
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


MTIME = 0  # every written member's time: the same samples give the same bytes
MODE = 0o644


class TarWriter:
    """A webdataset tar written as a stream to ``fileobj`` (e.g. ``ShardCommit.open``)."""

    def __init__(self, fileobj: IO):
        self._tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), MTIME, MODE
        self._tar.addfile(info, io.BytesIO(data))

    def add_sample(self, key: str, members: dict[str, bytes]) -> None:
        """``KEY.ext`` for each (extension, bytes), in the order given."""
        for ext, data in members.items():
            self.add(f"{key}.{ext}", data)

    def copy(self, info: tarfile.TarInfo, data: bytes) -> None:
        """A member of another tar, its header (name, time, mode, owner) and bytes kept."""
        new = tarfile.TarInfo(info.name)
        new.size, new.mtime, new.mode = len(data), info.mtime, info.mode
        new.uid, new.gid, new.uname, new.gname = info.uid, info.gid, info.uname, info.gname
        self._tar.addfile(new, io.BytesIO(data))

    def copy_sample(self, sample: Sample) -> None:
        for info in sample.infos:
            self.copy(info, sample.members[split_member_name(info.name)[1]])

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "TarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
