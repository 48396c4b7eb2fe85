"""Labelled data for fit-head: label tables (parquet/csv: key, label[, group]), labels carried by
webdataset samples (KEY.cls, KEY.label, or a field of KEY.json; KEY.json's ``group``), and folders
LABEL/IMAGE turned into labelled shards (through the one tar writer)."""

from __future__ import annotations

import io
import json
import os

from shardsmith.errors import InputError
from shardsmith.pipelines.core import fs as fsutil

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_labels(url: str) -> tuple[dict[str, float], dict[str, str] | None]:
    """(key -> label, key -> group or None) from a parquet or csv table with columns ``key``,
    ``label`` and optionally ``group`` (rows that must stay in one fold, e.g. an image and its
    watermarked copy)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        with fsutil.open_file(url) as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise InputError(f"LABELS {url}: file not found") from e
    try:
        t = pcsv.read_csv(io.BytesIO(raw)) if url.endswith((".csv", ".csv.gz")) else pq.read_table(io.BytesIO(raw))
    except Exception as e:
        raise InputError(f"LABELS {url}: not a readable {'csv' if '.csv' in url else 'parquet'} table: "
                         f"{type(e).__name__}: {e}") from e
    missing = [c for c in ("key", "label") if c not in t.column_names]
    if missing:
        raise InputError(f"LABELS {url}: no column {missing[0]!r} (columns: {', '.join(t.column_names)}); "
                         "expected key and label")
    out: dict[str, float] = {}
    for k, v in zip(t.column("key").to_pylist(), t.column("label").to_pylist()):
        if k is None or v is None:
            raise InputError(f"LABELS {url}: a row with a null key or label (key {k!r})")
        k = str(k)
        if k in out:
            raise InputError(f"LABELS {url}: key {k!r} appears more than once")
        try:
            out[k] = float(v)
        except (TypeError, ValueError) as e:
            raise InputError(f"LABELS {url}: label {v!r} of key {k!r} is not a number") from e
    groups = None
    if "group" in t.column_names:
        groups = {str(k): str(g) for k, g in zip(t.column("key").to_pylist(), t.column("group").to_pylist())}
    return out, groups


def _label_of(sample, field: str) -> float | None:
    """A sample's label: KEY.cls or KEY.label, or KEY.json's ``field`` (first, when a field other
    than ``label`` is asked for)."""
    meta = None
    if "json" in sample.members:
        meta = json.loads(sample.members["json"])
        meta = meta if isinstance(meta, dict) else None
    if field != "label" and meta is not None and meta.get(field) is not None:
        return float(meta[field])
    for ext in ("cls", "label"):
        if ext in sample.members:
            return float(sample.members[ext].decode().strip())
    if meta is not None and meta.get(field) is not None:
        return float(meta[field])
    return None


def labels_from_shards(urls: list[str], field: str, groups: dict | None = None) -> dict[str, float]:
    """key -> label of every sample that has one (KEY.cls, KEY.label or KEY.json's ``field``);
    ``groups`` (if given) is filled with key -> KEY.json's ``group`` where present."""
    from shardsmith.pipelines.formats.tar import iter_tar_samples

    out: dict[str, float] = {}
    for url in urls:
        for s in iter_tar_samples(url):
            if s.error_kind is not None:
                continue
            try:
                v = _label_of(s, field)
            except (ValueError, UnicodeDecodeError) as e:
                raise InputError(f"{url}: sample {s.key!r} has a label that is not a number: {e}") from e
            if v is not None:
                if s.key in out:
                    raise InputError(f"{url}: key {s.key!r} appears in more than one shard")
                out[s.key] = v
                if groups is not None and "json" in s.members:
                    meta = json.loads(s.members["json"])
                    g = meta.get("group") if isinstance(meta, dict) else None
                    if g is not None:
                        groups[s.key] = str(g)
    return out


def folders_to_shards(root: str, dest: str, per_shard: int = 1000) -> list[str]:
    """Folders ``LABEL/IMAGE`` (LABEL a number) as labelled webdataset shards in ``dest``."""
    from shardsmith.pipelines.formats.tar import TarWriter

    labels = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    items = []
    for lab in labels:
        try:
            value = float(lab)
        except ValueError as e:
            raise InputError(f"--images {root}: folder {lab!r} is not a label: name the folders by label "
                             "(0 and 1 for --task binary)") from e
        for f in sorted(os.listdir(os.path.join(root, lab))):
            if f.lower().endswith(IMAGE_SUFFIXES):
                items.append((lab, value, os.path.join(root, lab, f)))
    if not items:
        raise InputError(f"--images {root}: no images in label folders (expected {root}/LABEL/IMAGE)")
    os.makedirs(dest, exist_ok=True)
    urls = []
    for s in range(0, len(items), per_shard):
        url = os.path.join(dest, f"{s // per_shard:05d}.tar")
        with fsutil.atomic_write(url) as f, TarWriter(f) as tar:
            for i, (lab, value, path) in enumerate(items[s:s + per_shard], start=s):
                ext = os.path.splitext(path)[1].lstrip(".").lower()
                key = f"{''.join(c if c.isalnum() else '_' for c in lab)}_{i:07d}"
                tar.add_sample(key, {ext: open(path, "rb").read(), "cls": f"{value:g}".encode(),
                                     "json": json.dumps({"label": value, "file": path}).encode()})
        urls.append(url)
    return urls
