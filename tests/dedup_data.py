"""A held-out dataset with planted duplicates, for tests/test_dedup.py (and the README's defaults).

Two datasets (two curate RUNs), img2dataset layout (``NNNNN.tar`` + ``NNNNN.parquet``):

- **planted groups**: an original and copies of it of one or more kinds -- ``same_bytes`` (the same
  file), ``reencoded`` (decoded and saved again as JPEG at another quality, or as PNG), ``resized``
  (scaled by 0.5-0.8, re-encoded), ``cropped`` (1.5-3 % cut from each side, re-encoded) -- placed in
  the same shard, in another shard of the same RUN, or in the other RUN;
- **look-alikes**: images drawn with the same smooth colour field as an original but other shapes
  (the same scene with other objects): distinct images that must not be found;
- **singletons**: unrelated images.

Each image is a smooth colour field with soft shapes and grain, like jobs/sample_data.py's. The
truth (key -> group, kind) is returned, not written where a run could read it.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

from shardsmith.filters.fingerprint import sha256_hex
from shardsmith.pipelines.formats.tar import TarWriter

KINDS = ("same_bytes", "reencoded", "resized", "cropped")


def scene(bg_seed: int, shape_seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(bg_seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy = rng.uniform(0.5, 3, 2) / max(w, h)
        ph = rng.uniform(0, 2 * np.pi, 2)
        base[..., c] = 127 + 90 * np.sin(2 * np.pi * fx * xx + ph[0]) * np.cos(2 * np.pi * fy * yy + ph[1])
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    srng = np.random.default_rng(10_000 + shape_seed)
    draw = ImageDraw.Draw(img)
    for _ in range(int(srng.integers(3, 6))):
        x0, y0 = srng.integers(0, w), srng.integers(0, h)
        rx, ry = srng.integers(w // 8, w // 3), srng.integers(h // 8, h // 3)
        draw.ellipse([x0 - rx, y0 - ry, x0 + rx, y0 + ry], fill=tuple(int(v) for v in srng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(radius=2))
    grain = np.random.default_rng(20_000 + shape_seed).normal(0, 5, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def variant(original: bytes, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    if kind == "same_bytes":
        return original, "jpg"
    img = Image.open(io.BytesIO(original)).convert("RGB")
    w, h = img.size
    if kind == "reencoded":
        if rng.random() < 0.5:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue(), "png"
        return jpeg(img, int(rng.integers(55, 75))), "jpg"
    if kind == "resized":
        s = rng.uniform(0.5, 0.8)
        return jpeg(img.resize((max(16, int(w * s)), max(16, int(h * s))), Image.Resampling.BICUBIC), 85), "jpg"
    if kind == "cropped":
        f = rng.uniform(0.015, 0.03, 4)
        box = (int(w * f[0]), int(h * f[1]), w - int(w * f[2]), h - int(h * f[3]))
        return jpeg(img.crop(box), 88), "jpg"
    raise ValueError(kind)


def make_planted(root: str, groups: int = 16, lookalikes: int = 8, singletons: int = 24, seed: int = 0) -> dict:
    """Write ``root/a/0000N.tar|parquet`` (two shards) and ``root/b/00000.tar|parquet`` (one);
    returns {"runs": [dir_a, dir_b], "truth": {key: (group, kind)}, "groups": {group: [keys]}}."""
    rng = np.random.default_rng(seed)
    slots = [("a", "00000"), ("a", "00001"), ("b", "00000")]
    rows: dict = {s: [] for s in slots}
    truth: dict = {}
    n = 0

    def put(slot, data, ext, group, kind, caption):
        nonlocal n
        key = f"{slot[0]}{slot[1][-1]}_{n:04d}"
        n += 1
        rows[slot].append((key, data, ext, caption))
        truth[key] = (group, kind)
        return key

    for g in range(groups):
        w, h = int(rng.integers(180, 320)), int(rng.integers(180, 320))
        original = jpeg(scene(g, g, w, h))
        home = slots[int(rng.integers(0, 3))]
        put(home, original, "jpg", f"g{g}", "original", f"photo {g}")
        kinds = [KINDS[g % 4]] + ([KINDS[(g + 1) % 4]] if g % 3 == 0 else [])
        for j, kind in enumerate(kinds):
            where = (home, slots[(slots.index(home) + 1) % 3], slots[(slots.index(home) + 2) % 3])[(g + j) % 3]
            data, ext = variant(original, kind, rng)
            put(where, data, ext, f"g{g}", kind, f"photo {g} copy")
        if g < lookalikes:  # the same colour field, other shapes: a distinct picture
            put(slots[int(rng.integers(0, 3))], jpeg(scene(g, 500 + g, w, h)), "jpg", f"l{g}", "lookalike",
                f"photo {g} lookalike")
    for s in range(singletons):
        put(slots[s % 3], jpeg(scene(1000 + s, 1000 + s, int(rng.integers(180, 320)), int(rng.integers(180, 320)))),
            "jpg", f"s{s}", "singleton", f"single {s}")
    for slot in slots:
        order = rng.permutation(len(rows[slot]))
        rows[slot] = [rows[slot][i] for i in order]
    for slot, items in rows.items():
        d = os.path.join(root, slot[0])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{slot[1]}.tar"), "wb") as f, TarWriter(f) as tar:
            for key, data, ext, caption in items:
                tar.add_sample(key, {ext: data, "txt": caption.encode()})
        index = []
        for key, data, ext, caption in items:
            w, h = Image.open(io.BytesIO(data)).size
            index.append({"key": key, "url": f"http://example.invalid/{key}.{ext}", "caption": caption,
                          "status": "success", "width": w, "height": h, "original_width": w, "original_height": h,
                          "sha256": sha256_hex(data)})
        pq.write_table(pa.Table.from_pylist(index), os.path.join(d, f"{slot[1]}.parquet"))
    groups_of: dict = {}
    for key, (group, _) in truth.items():
        groups_of.setdefault(group, []).append(key)
    return {"runs": [os.path.join(root, "a"), os.path.join(root, "b")], "truth": truth, "groups": groups_of}
