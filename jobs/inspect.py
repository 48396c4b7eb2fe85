"""``shardsmith inspect PATH``: a shard's samples and scores as a table in the terminal, one sample
in full, and its image written out.

PATH is a scores parquet (OUTPUT/scores/NNNNN.parquet), a curated or input webdataset tar, or an
OUTPUT folder with --shard NNNNN (an OUTPUT folder alone lists its shards). With --key KEY one
sample is shown in full; --write-image FILE writes that sample's image bytes as they are in the
tar (for a scores parquet, the image is found through the run's manifest.json: the curated tar for
kept rows, the input tar for the others). Any fsspec URL works (s3://, http://, ...).

    shardsmith inspect OUTPUT --shard 00000 --status dropped --sort aesthetic
    shardsmith inspect OUTPUT/scores/00000.parquet --key 000000012 --write-image sample.jpg
    shardsmith inspect data/00000.tar --key 000000012 --write-image sample.jpg

    python -m shardsmith.jobs.inspect PATH [options]      (the same as `shardsmith inspect`)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

from shardsmith.errors import ShardsmithError
from shardsmith.jobs.entry import job_main

BASE_COLUMNS = {"key", "row", "status", "reason", "error", "original_width", "original_height", "caption", "url",
                "generated", "image", "bytes", "width", "height", "members", "tar_error", "json", "scores_row"}


class InspectError(ShardsmithError):
    """A problem with what was asked (unknown path, key, shard); one line, exit code 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="scores parquet, curated/input tar, or OUTPUT folder (with --shard)")
    p.add_argument("--shard", help="with an OUTPUT folder: the shard to show (e.g. 00000)")
    p.add_argument("--key", help="show this sample in full")
    p.add_argument("--write-image", metavar="FILE", help="with --key: write the sample's image bytes to FILE")
    p.add_argument("--status", choices=["kept", "dropped", "error"], help="only rows with this status")
    p.add_argument("--sort", metavar="FIELD", help="sort by this column, largest first (e.g. aesthetic)")
    p.add_argument("--ascending", action="store_true", help="with --sort: smallest first")
    p.add_argument("--limit", type=int, default=50, help="rows to print (default 50, 0 = all)")


# ---------------------------------------------------------------------------------------------
# Text safety and formatting
# ---------------------------------------------------------------------------------------------

def clean(value, width: int | None = None) -> str:
    """Data from a dataset is untrusted: no terminal escape sequence or newline reaches the screen."""
    text = "" if value is None else str(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    if width and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def fmt_score(v) -> str:
    return "" if v is None or v != v else f"{v:.3f}"


def fmt_size(w, h) -> str:
    return f"{w}x{h}" if w and h else ""


# ---------------------------------------------------------------------------------------------
# What PATH is
# ---------------------------------------------------------------------------------------------

def _parent(url: str) -> tuple[str, str]:
    """(folder, file name) of a URL or path."""
    url = url.rstrip("/")
    if "/" not in url:
        return ".", url
    head, tail = url.rsplit("/", 1)
    return head or "/", tail


def output_root_of(url: str, subdir: str) -> str | None:
    """OUTPUT for OUTPUT/<subdir>/<file>, when that folder holds a run's manifest.json."""
    from shardsmith.pipelines.core import fs as fsutil

    folder, _ = _parent(url)
    root, name = _parent(folder)
    if name == subdir and fsutil.exists(fsutil.join(root, "manifest.json")):
        return root
    return None


def run_scores(url: str, rows: list[dict]):
    """The score columns to show: the run's (its manifest's ScoreSet) for a file of an OUTPUT
    folder; else the built-ins and any other numeric column of the rows."""
    from shardsmith.filters.scores import Score, ScoreSet
    from shardsmith.pipelines.core import fs as fsutil

    root = output_root_of(url, "scores") or output_root_of(url, "curated")
    if root is not None:
        return ScoreSet.from_manifest(json.loads(fsutil.read_text(fsutil.join(root, "manifest.json"))))
    scores = ScoreSet.for_run()
    other = [k for k in (rows[0] if rows else {}) if k not in BASE_COLUMNS and k not in scores
             and any(isinstance(r.get(k), float) for r in rows)]
    return ScoreSet([*scores, *[Score(k, k, k[:8], "embedding", (float("-inf"), float("inf"))) for k in other]])


def shard_name(url: str) -> str:
    return _parent(url)[1].split(".", 1)[0]


def resolve(path: str, shard: str | None) -> tuple[str, str]:
    """('output' | 'parquet' | 'tar', url)."""
    from shardsmith.pipelines.core import fs as fsutil

    try:
        exists = fsutil.exists(path)
    except Exception as e:
        raise InspectError(f"{path}: cannot read: {type(e).__name__}: {e}") from e
    if not exists:
        raise InspectError(f"{path}: no such file or folder")
    if fsutil.isdir(path):
        if not shard:
            return "output", path
        url = fsutil.join(path, "scores", f"{shard}.parquet")
        if not fsutil.exists(url):
            from shardsmith.pipelines.report.data import scores_files

            known = [n for n, _ in scores_files(path)]
            raise InspectError(f"{path} has no shard {shard!r} (no scores/{shard}.parquet); shards: "
                               f"{', '.join(known[:20]) or 'none'}{' ...' if len(known) > 20 else ''}")
        return "parquet", url
    if shard:
        raise InspectError("--shard goes with an OUTPUT folder; PATH is a file")
    if path.endswith(".parquet"):
        return "parquet", path
    if path.endswith(".tar"):
        return "tar", path
    raise InspectError(f"{path}: expected a .parquet or .tar file, or an OUTPUT folder")


# ---------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------

def parquet_rows(url: str) -> list[dict]:
    import pyarrow.parquet as pq

    from shardsmith.pipelines.core import fs as fsutil

    try:
        with fsutil.open_file(url, "rb") as f:
            return pq.read_table(f, use_threads=False).to_pylist()  # see pipelines/report/data.py _read_scores
    except Exception as e:
        raise InspectError(f"{url}: cannot read as parquet: {type(e).__name__}: {e}") from e


def image_size(data: bytes | None) -> tuple[int, int] | None:
    """The size an image declares in its header (nothing is decoded)."""
    if not data:
        return None
    from PIL import Image

    from shardsmith.pipelines.formats.tar import PIL_FORMATS

    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
            return im.size
    except Exception:
        return None


def tar_rows(url: str, key: str | None = None) -> list[dict]:
    """One row per sample of a tar, joined with the run's scores when the tar is OUTPUT/curated/.
    With ``key``: only that sample, read up to it, with its image bytes under ``_image``."""
    from shardsmith.pipelines.formats.tar import iter_tar_samples

    scores = {}
    root = output_root_of(url, "curated")
    if root is not None:
        from shardsmith.pipelines.core import fs as fsutil

        scores_url = fsutil.join(root, "scores", f"{shard_name(url)}.parquet")
        if fsutil.exists(scores_url):
            scores = {r["key"]: r for r in parquet_rows(scores_url)}
    rows = []
    try:
        for s in iter_tar_samples(url):
            if key is not None and s.key != key:
                continue
            size = image_size(s.image)
            row = {"row": s.row, "key": s.key, "image": s.image_ext or "", "bytes": len(s.image or b""),
                   "width": size[0] if size else None, "height": size[1] if size else None,
                   "caption": s.caption(), "members": {ext: len(b) for ext, b in s.members.items()},
                   "tar_error": s.error_kind}
            if s.key in scores:
                sc = scores[s.key]
                row.update({k: v for k, v in sc.items() if k in ("status", "reason", "error", "url")
                            or k not in BASE_COLUMNS})  # and the score columns
                row["scores_row"] = sc.get("row")
            if "json" in s.members:
                row["json"] = s.members["json"]
            rows.append(row)
            if key is not None:
                row["_image"] = s.image
                break
    except Exception as e:
        raise InspectError(f"{url}: cannot read as a tar: {type(e).__name__}: {e}") from e
    return rows


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------

def select(rows: list[dict], status: str | None, sort: str | None, ascending: bool) -> list[dict]:
    if status:
        if rows and "status" not in rows[0]:
            raise InspectError("--status: these rows have no status column (not a scores parquet or curated tar)")
        rows = [r for r in rows if r.get("status") == status]
    if sort:
        if rows and sort not in rows[0]:
            raise InspectError(f"--sort: no column {sort!r}; columns: {', '.join(rows[0])}")
        have = [r for r in rows if isinstance(r.get(sort), (int, float)) and r.get(sort) == r.get(sort)]
        rest = [r for r in rows if r not in have]
        rows = sorted(have, key=lambda r: r[sort], reverse=not ascending) + rest
    return rows


def print_table(rows: list[dict], kind: str, limit: int, total: int, out=None, score_set=None) -> None:
    out = out or sys.stdout
    from shardsmith.filters.scores import ScoreSet
    from shardsmith.pipelines.core.progress import table

    shown = rows if limit == 0 else rows[:limit]
    has_status = any("status" in r for r in rows)
    headers = ["row", "key"]
    if kind == "tar":
        headers += ["image", "bytes"]
    if has_status:
        headers += ["status", "reason"]
    score_set = score_set or ScoreSet.for_run()
    scores = [(s.name, s.short) for s in score_set if any(r.get(s.name) is not None for r in rows)]
    headers += [s for _, s in scores] + ["size", "caption"]
    lines = []
    for r in shown:
        cells = [r.get("row", ""), clean(r.get("key"))]
        if kind == "tar":
            cells += [clean(r.get("image")) or clean(r.get("tar_error")), r.get("bytes", "")]
        if has_status:
            cells += [clean(r.get("status")), clean(r.get("reason"), 24)]
        cells += [fmt_score(r.get(f)) for f, _ in scores]
        w = r.get("original_width", r.get("width"))
        h = r.get("original_height", r.get("height"))
        cells += [fmt_size(w, h), clean(r.get("caption"), 40)]
        lines.append(cells)
    aligns = "rl" + ("lr" if kind == "tar" else "") + ("ll" if has_status else "") + "r" * len(scores) + "rl"
    print(table(headers, lines, aligns) if lines else "(no rows)", file=out)
    if len(shown) < len(rows) or len(rows) < total:
        print(f"\n{len(shown)} of {len(rows)} rows shown" + (f" ({total} in the file)" if len(rows) < total else "")
              + ("; --limit 0 shows all" if len(shown) < len(rows) else ""), file=out)


def print_sample(row: dict, out=None) -> None:
    out = out or sys.stdout
    for k, v in row.items():
        if k == "json":
            try:
                v = json.dumps(json.loads(v), ensure_ascii=False, sort_keys=True)
            except (ValueError, UnicodeDecodeError):
                v = repr(v[:200])
        elif k == "members":
            v = ", ".join(f"{ext} ({n} bytes)" for ext, n in v.items())
        elif isinstance(v, float):
            v = f"{v:.6g}"
        print(f"{k:>16}: {clean(v)}", file=out)


def print_output(root: str, out=None) -> None:
    """An OUTPUT folder without --shard: its shards and their counts."""
    out = out or sys.stdout
    from shardsmith.pipelines.core import fs as fsutil
    from shardsmith.pipelines.core.progress import table
    from shardsmith.pipelines.report.data import scores_files

    stats_url = fsutil.join(root, "stats.json")
    if fsutil.exists(stats_url):
        stats = json.loads(fsutil.read_text(stats_url))
        shards = stats.get("shards", {})
        rows = [[clean(n), e.get("rows_read"), e.get("kept"), e.get("dropped"), e.get("errors")]
                for n, e in shards.items()]
        if "rows_read" in stats:
            rows.append(["TOTAL", stats["rows_read"], stats.get("kept"), stats.get("dropped"), stats.get("errors")])
        print(table(["shard", "rows", "kept", "dropped", "errors"], rows), file=out)
    else:
        names = [n for n, _ in scores_files(root)]
        if not names:
            raise InspectError(f"{root}: neither stats.json nor scores/ here: not a shardsmith OUTPUT folder")
        print("shards (no stats.json yet: the run has not finished):\n  " + "\n  ".join(names), file=out)
    print(f"\nshow a shard: shardsmith inspect {root} --shard NAME", file=out)


# ---------------------------------------------------------------------------------------------
# Writing an image
# ---------------------------------------------------------------------------------------------

def image_of_parquet_row(url: str, row: dict) -> tuple[bytes, str, str]:
    """(bytes, extension, source tar) of a scores parquet row, found through the run's manifest."""
    from shardsmith.pipelines.core import fs as fsutil
    from shardsmith.pipelines.report.samples import Wanted, fetch_images

    root = output_root_of(url, "scores")
    if root is None:
        raise InspectError(f"{url}: no manifest.json in the folder above scores/, so the input tars are unknown; "
                           "inspect the input tar itself with --key")
    manifest = json.loads(fsutil.read_text(fsutil.join(root, "manifest.json")))
    if any(i.get("kind") == "metadata" for i in manifest.get("inputs", [])):
        raise InspectError(f"{root} is a metadata-only run: it has no images (the row's url is "
                           f"{clean(row.get('url'))})")
    shard = shard_name(url)
    found = fetch_images(root, manifest, [Wanted(shard, int(row["row"]), str(row["key"]), str(row.get("status")))])
    img = found[(shard, int(row["row"]))]
    if img.data is None:
        raise InspectError(f"key {clean(row['key'])!r}: no image: {clean(img.problem)}")
    return img.data, img.ext or "bin", img.source or ""


def write_image(target: str, data: bytes, ext: str, source: str, out=None) -> None:
    out = out or sys.stdout
    from shardsmith.pipelines.core import fs as fsutil

    try:
        fsutil.write_bytes_atomic(target, data)
    except Exception as e:
        raise InspectError(f"--write-image {target}: cannot write: {type(e).__name__}: {e}") from e
    size = image_size(data)
    what = f"{size[0]}x{size[1]} " if size else "not decodable, "
    print(f"wrote {len(data)} bytes ({what}.{ext}, from {clean(source)}) to {target}", file=out)
    if not target.lower().endswith(f".{ext}") and not (ext == "jpg" and target.lower().endswith(".jpeg")):
        print(f"note: the bytes are a .{ext} file, whatever the name {target} says", file=out)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def inspect_path(args: argparse.Namespace, out=None) -> None:
    out = out or sys.stdout
    if args.write_image and not args.key:
        raise InspectError("--write-image needs --key KEY (the sample whose image to write)")
    if args.limit < 0:
        raise InspectError("--limit must be >= 0")
    kind, url = resolve(args.path, args.shard)
    if kind == "output":
        if args.key:
            raise InspectError("--key needs a shard: add --shard NAME, or give a scores parquet or tar")
        print_output(url, out)
        return
    rows = parquet_rows(url) if kind == "parquet" else tar_rows(url, args.key)
    if args.key is not None:
        match = [r for r in rows if str(r.get("key")) == args.key]
        if not match:
            raise InspectError(f"key {clean(args.key)!r} is not in {url}")
        sample = match[0]
        image = sample.pop("_image", None)
        print_sample(sample, out)
        if args.write_image:
            if kind == "tar":
                if image is None:
                    raise InspectError(f"key {clean(args.key)!r} has no image member in {url}")
                data, ext, source = image, sample["image"], url
            else:
                data, ext, source = image_of_parquet_row(url, sample)
            write_image(args.write_image, data, ext, source, out)
        return
    print(f"{url}: {len(rows)} rows", file=out)
    chosen = select(rows, args.status, args.sort, args.ascending)
    print_table(chosen, kind, args.limit, len(rows), out, run_scores(url, rows))


def run(args: argparse.Namespace) -> int:
    try:
        inspect_path(args)
    except BrokenPipeError:  # `shardsmith inspect ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.inspect", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
