"""``shardsmith make-watermark-data CLEAN_IMAGES OUTPUT``: training data for a CLIP-based watermark
head, from images without watermarks.

For every readable image of CLEAN_IMAGES (webdataset shards: a folder of .tar, a glob or brace
pattern; or a folder of image files) it writes two samples: the image as it is (label 0) and the
same image with a synthetic visible watermark (label 1): tiled text, corner text, a logo or a
banner, opacity 0.1-0.6, several sizes and PIL's own fonts (``filters/visible_watermark.py``).
Both are re-encoded the same way (JPEG, --quality, at most --max-side pixels), so that only the mark
tells them apart. They land in the same output shard, so a split by shard keeps pairs together.

OUTPUT/NNNNN.tar holds KEY.jpg, KEY.cls (0/1), KEY.txt (the source caption, if any) and KEY.json
(label, source key, the pair's group, what was drawn); OUTPUT/labels.parquet lists key, label and
group (fit-head keeps a pair in one fold: split apart, the clean twin would leak the answer); OUTPUT/summary.json
counts what was written and skipped. Feed it to ``shardsmith fit-head --images OUTPUT HEAD``.
Same arguments, same bytes.

    python -m shardsmith.jobs.make_watermark_data CLEAN_IMAGES OUTPUT [--per-shard 500] [--seed 0]
"""

from __future__ import annotations

import argparse

from shardsmith.jobs.entry import job_main

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("clean_images", help="webdataset shards (folder, glob, {a,b} pattern) or a folder of images")
    p.add_argument("output", help="folder for the labelled shards (local path or fsspec URL)")
    p.add_argument("--per-shard", type=int, default=500, help="source images per output shard (default 500: "
                                                              "1000 samples)")
    p.add_argument("--max-side", type=int, default=1024, help="downscale larger images to this side (default 1024)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of both samples (default 90)")
    p.add_argument("--limit", type=int, default=0, help="use at most N source images (default all)")
    p.add_argument("--skip-if", metavar="FIELD", help="leave out source samples whose KEY.json FIELD is true (e.g. "
                                                      "images already known to carry a watermark)")
    p.add_argument("--seed", type=int, default=0)


def iter_sources(spec: str, skip_if: str | None):
    """(source key, image bytes, caption, why skipped or None), in input order."""
    import json
    import os

    from shardsmith.pipelines.core import fs as fsutil
    from shardsmith.pipelines.formats.inputs import find_inputs
    from shardsmith.pipelines.formats.labels import IMAGE_SUFFIXES
    from shardsmith.pipelines.formats.tar import iter_tar_samples

    from shardsmith.errors import InputError

    urls = [] if fsutil.isdir(spec) else [u for u in find_inputs(spec) if fsutil.exists(u)]
    if not fsutil.isdir(spec) and not urls:
        raise InputError(f"{spec}: no such file or folder (expected webdataset shards or a folder of images)")
    if fsutil.isdir(spec) and not fsutil.list_files(spec, (".tar",)):
        for name in sorted(os.listdir(spec)):
            if name.lower().endswith(IMAGE_SUFFIXES):
                with open(os.path.join(spec, name), "rb") as f:
                    yield os.path.splitext(name)[0], f.read(), None, None
        return
    for url in urls or find_inputs(spec):
        if not url.endswith(".tar"):
            continue
        shard = url.rstrip("/").rsplit("/", 1)[-1][:-4]
        for s in iter_tar_samples(url):
            key = f"{shard}/{s.key}"
            if s.error_kind:
                yield key, None, None, s.error_kind
                continue
            if skip_if and "json" in s.members:
                try:
                    meta = json.loads(s.members["json"])
                except ValueError:
                    meta = {}
                if isinstance(meta, dict) and meta.get(skip_if):
                    yield key, None, None, f"skip_if:{skip_if}"
                    continue
            yield key, s.image, s.caption(), None


def make_watermark_data(spec: str, output: str, per_shard: int = 500, max_side: int = 1024, quality: int = 90,
                        limit: int = 0, skip_if: str | None = None, seed: int = 0, log=print) -> dict:
    import io
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from shardsmith.filters.visible_watermark import add_visible_watermark
    from shardsmith.pipelines.core import fs as fsutil
    from shardsmith.pipelines.formats.tar import PIL_FORMATS, TarWriter

    def encode(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    fsutil.makedirs(output)
    labels, skipped, kinds = [], {}, {}
    shard, writer, fobj, n_in_shard, used = 0, None, None, 0, 0
    first_skip = None

    def close(exc=None):
        """Commit the open shard (rename into place), or, after an error, discard it."""
        nonlocal writer, fobj
        if writer is not None:
            if exc is None:
                writer.close()
                fobj.__exit__(None, None, None)
            else:
                fobj.__exit__(type(exc), exc, exc.__traceback__)
            writer = fobj = None

    try:
        for idx, (src_key, data, caption, skip) in enumerate(iter_sources(spec, skip_if)):
            if limit and used >= limit:
                break
            img = None
            if skip is None:
                try:
                    img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
                    img.load()
                    img = img.convert("RGB")
                except Exception as e:
                    skip = "decode_error"
                    first_skip = first_skip or f"{src_key}: {type(e).__name__}: {e}"
            if skip is not None:
                skipped[skip] = skipped.get(skip, 0) + 1
                first_skip = first_skip or f"{src_key}: {skip}"
                continue
            if max(img.size) > max_side:
                img.thumbnail((max_side, max_side), Image.LANCZOS)
            rng = np.random.default_rng([seed, used])
            marked, info = add_visible_watermark(img, rng)
            kinds[info["kind"]] = kinds.get(info["kind"], 0) + 1
            if writer is None:
                fobj = fsutil.atomic_write(fsutil.join(output, f"{shard:05d}.tar"))
                writer = TarWriter(fobj.__enter__())
            base = f"{used:08d}"
            for label, picture, drawn in ((0, img, None), (1, marked, info)):
                key = f"{base}_{'wm' if label else 'clean'}"
                members = {"jpg": encode(picture), "cls": str(label).encode()}
                if caption:
                    members["txt"] = caption.encode()
                members["json"] = json.dumps({"key": key, "label": label, "source": src_key, "group": base,
                                              "watermark": drawn, "width": picture.width,
                                              "height": picture.height}).encode()
                writer.add_sample(key, members)
                labels.append((key, label, base, src_key, info["kind"] if label else None))
            used += 1
            n_in_shard += 1
            if n_in_shard >= per_shard:
                close()
                shard, n_in_shard = shard + 1, 0
    except BaseException as e:
        close(e)  # a half-written shard never appears under its final name
        raise
    close()
    if not labels:
        from shardsmith.errors import InputError

        raise InputError(f"{spec}: no readable image to make watermark data from"
                         + (f" (skipped: {skipped}; first: {first_skip})" if skipped else ""))
    t = pa.table({"key": [r[0] for r in labels], "label": pa.array([r[1] for r in labels], pa.int8()),
                  "group": [r[2] for r in labels], "source": [r[3] for r in labels], "kind": [r[4] for r in labels]})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    fsutil.write_bytes_atomic(fsutil.join(output, "labels.parquet"), buf.getvalue())
    summary = {"source": spec, "images": used, "samples": len(labels), "shards": shard + (1 if n_in_shard else 0),
               "kinds": kinds, "skipped": skipped, "first_skipped": first_skip, "seed": seed,
               "max_side": max_side, "quality": quality}
    fsutil.write_bytes_atomic(fsutil.join(output, "summary.json"), (json.dumps(summary, indent=1) + "\n").encode())
    log(f"make-watermark-data: {used} source images -> {len(labels)} samples ({used} clean, {used} watermarked: "
        f"{', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}) in {summary['shards']} shard(s) in {output}"
        + (f"; skipped {sum(skipped.values())} ({', '.join(f'{k} {v}' for k, v in skipped.items())}; first: "
           f"{first_skip})" if skipped else ""))
    return summary


def run(args: argparse.Namespace) -> int:
    from shardsmith.errors import ConfigError

    if args.per_shard < 1 or args.max_side < 16 or not 1 <= args.quality <= 100 or args.limit < 0:
        raise ConfigError("--per-shard must be >= 1, --max-side >= 16, --quality in [1, 100], --limit >= 0")
    make_watermark_data(args.clean_images, args.output, args.per_shard, args.max_side, args.quality, args.limit,
                        args.skip_if, args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.make_watermark_data", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
