"""``shardsmith sample-data DIR``: a deterministic LAION-style sample dataset.

Writes img2dataset-style shards ``DIR/images/NNNNN.tar`` (+ ``NNNNN.parquet``) holding photo-like
textures, some low-resolution images, some with visible text watermarks and a few broken samples
(corrupt bytes, a truncated JPEG, a sample with no image), and LAION metadata parquet files
``DIR/metadata/part-NNNNN.parquet`` (URL, TEXT, WIDTH, HEIGHT, similarity, punsafe, pwatermark,
AESTHETIC_SCORE) for metadata-only mode. Same arguments, same bytes.

    python -m shardsmith.jobs.sample_data DIR [--shards 3] [--per-shard 100]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os

from shardsmith.jobs.entry import job_main

SUBJECTS = ["a mountain lake", "a red bicycle", "an old lighthouse", "a bowl of fruit", "a city street at night",
            "a field of sunflowers", "a sleeping cat", "a wooden boat", "a forest path", "a desert canyon",
            "a plate of pasta", "a snowy cabin", "a vintage car", "a coral reef", "a hot air balloon"]
STYLES = ["photo", "oil painting", "watercolor", "close-up photograph", "stock photo", "illustration"]
WATERMARKS = ["© stockimages", "SAMPLE", "shutterpix.com", "© photobank", "PREVIEW"]


def caption_for(rng: np.random.Generator) -> str:
    return f"{rng.choice(STYLES)} of {rng.choice(SUBJECTS)}"


def texture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A photo-like texture: a smooth colour field, a few soft shapes, fine grain."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy = rng.uniform(0.5, 4, 2) / max(w, h)
        phase = rng.uniform(0, 2 * np.pi, 2)
        base[..., c] = 127 + 90 * np.sin(2 * np.pi * fx * xx + phase[0]) * np.cos(2 * np.pi * fy * yy + phase[1])
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        rx, ry = rng.integers(w // 16 + 1, w // 3 + 2), rng.integers(h // 16 + 1, h // 3 + 2)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse([x0 - rx, y0 - ry, x0 + rx, y0 + ry], fill=color)
    img = img.filter(ImageFilter.GaussianBlur(radius=max(1, min(w, h) // 60)))
    grain = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8))


def add_watermark(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Tile a visible text watermark over the image, the way stock sites do."""
    from PIL import Image, ImageDraw

    img = img.convert("RGBA")
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    text = str(rng.choice(WATERMARKS))
    w, h = img.size
    step = max(24, min(w, h) // 4)
    for y in range(0, h, step):
        for x in range(-(y % (2 * step)), w, 2 * step):
            draw.text((x, y), text, fill=(255, 255, 255, 150))
            draw.text((x + 1, y + 1), text, fill=(0, 0, 0, 90))
    return Image.alpha_composite(img, layer).convert("RGB")


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=90)
    elif fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def make_sample(rng: np.random.Generator, i: int, max_size: int = 1024) -> dict:
    """One sample's image, caption and ground truth; every ~7th small, ~6th watermarked."""
    small = i % 7 == 3
    lo = min(256, max_size // 2)
    w = int(rng.integers(24, 128)) if small else int(rng.integers(lo, max_size))
    h = int(rng.integers(24, 128)) if small else int(rng.integers(lo, max_size))
    img = texture(rng, w, h)
    watermarked = i % 6 == 1
    if watermarked:
        img = add_watermark(img, rng)
    fmt = "png" if i % 11 == 5 else ("webp" if i % 13 == 7 else "jpg")
    return {"image": img, "fmt": fmt, "caption": caption_for(rng), "watermarked": watermarked}


def write_shard(out_dir: str, shard: int, n: int, seed: int, max_size: int = 1024) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng([seed, shard])
    rows = []
    tar_path = os.path.join(out_dir, f"{shard:05d}.tar")
    from shardsmith.pipelines.formats.tar import TarWriter

    with open(tar_path, "wb") as f, TarWriter(f) as tar:
        for i in range(n):
            key = f"{shard:05d}{i:04d}"
            s = make_sample(rng, i, max_size)
            data = encode(s["image"], s["fmt"])
            broken = None
            if i == n - 5:
                data, broken = rng.bytes(2000), "random bytes"  # not an image at all
            elif i == n - 9:
                data, broken = data[: len(data) // 3], "truncated jpeg"
            w, h = s["image"].size
            meta = {"url": f"https://images.example.com/{key}.{s['fmt']}", "key": key, "caption": s["caption"],
                    "status": "success", "error_message": None, "width": w, "height": h,
                    "original_width": w, "original_height": h, "sample_watermarked": s["watermarked"],
                    "sample_broken": broken}
            members = {s["fmt"]: data, "txt": s["caption"].encode(), "json": json.dumps(meta).encode()}
            if i == n - 13:  # a sample whose image member is missing
                members.pop(s["fmt"])
            tar.add_sample(key, members)
            rows.append({"key": key, "url": meta["url"], "caption": s["caption"], "status": "success",
                         "error_message": None, "width": w, "height": h, "original_width": w,
                         "original_height": h, "exif": "{}", "sha256": hashlib.sha256(data).hexdigest()})
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(out_dir, f"{shard:05d}.parquet"))
    return {"tar": tar_path, "rows": n}


def write_metadata(out_dir: str, files: int, rows: int, seed: int) -> list[str]:
    """LAION-5B-style metadata with the upper-case column names of the original release."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = []
    for f in range(files):
        rng = np.random.default_rng([seed, 1000 + f])
        sims = np.clip(rng.normal(0.31, 0.04, rows), -1, 1)
        t = pa.table({
            "SAMPLE_ID": pa.array(np.arange(f * rows, (f + 1) * rows, dtype=np.int64)),
            "URL": [f"https://images.example.com/m{f}-{i}.jpg" for i in range(rows)],
            "TEXT": [caption_for(rng) for _ in range(rows)],
            "WIDTH": rng.integers(64, 2048, rows).astype(np.int32),
            "HEIGHT": rng.integers(64, 2048, rows).astype(np.int32),
            "LICENSE": ["?"] * rows,
            "NSFW": ["UNLIKELY"] * rows,
            "similarity": sims,
            "punsafe": rng.beta(0.5, 6, rows).astype(np.float32),
            "pwatermark": rng.beta(0.6, 2.0, rows).astype(np.float32),
            "AESTHETIC_SCORE": rng.normal(5.0, 0.8, rows).astype(np.float32),
        })
        path = os.path.join(out_dir, f"part-{f:05d}.parquet")
        pq.write_table(t, path)
        paths.append(path)
    return paths


def make_sample_data(out: str, shards: int = 3, per_shard: int = 100, metadata_files: int = 2,
                     metadata_rows: int = 5000, seed: int = 0, max_size: int = 1024) -> dict:
    images_dir, meta_dir = os.path.join(out, "images"), os.path.join(out, "metadata")
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(meta_dir, exist_ok=True)
    written = [write_shard(images_dir, s, per_shard, seed, max_size) for s in range(shards)]
    metas = write_metadata(meta_dir, metadata_files, metadata_rows, seed)
    return {"images": images_dir, "metadata": meta_dir, "shards": [w["tar"] for w in written],
            "rows": sum(w["rows"] for w in written), "metadata_files": metas}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder to write the sample into (local path)")
    p.add_argument("--shards", type=int, default=3, help="number of webdataset shards (default 3)")
    p.add_argument("--per-shard", type=int, default=100, help="samples per shard (default 100)")
    p.add_argument("--metadata-files", type=int, default=2, help="LAION metadata parquet files (default 2)")
    p.add_argument("--metadata-rows", type=int, default=5000, help="rows per metadata file (default 5000)")
    p.add_argument("--max-size", type=int, default=1024, help="largest image side in pixels (default 1024)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from shardsmith.errors import ConfigError, RunError

    if args.shards < 1 or args.per_shard < 16 or args.max_size < 64:
        raise ConfigError("--shards must be >= 1, --per-shard >= 16 and --max-size >= 64")
    try:
        info = make_sample_data(args.dir, args.shards, args.per_shard, args.metadata_files, args.metadata_rows,
                                args.seed, args.max_size)
    except OSError as e:
        raise RunError(f"{args.dir}: cannot write the sample dataset: {type(e).__name__}: {e}") from e
    print(f"wrote {len(info['shards'])} shards ({info['rows']} samples) to {info['images']} and "
          f"{len(info['metadata_files'])} metadata files to {info['metadata']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.sample_data", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
