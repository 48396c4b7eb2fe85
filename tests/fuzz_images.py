"""Seeded mutations of small valid images, for the decoder fuzz test (tests/test_fuzz_decode.py) and
the longer campaign (bench/fuzz_decode.py).

Seeds: JPEG (baseline, progressive, grayscale, CMYK, with EXIF), PNG (RGB, RGBA, palette, 16-bit,
interlaced), WebP (lossy, lossless, animated), GIF (animated), BMP, TIFF. Mutations: truncation,
bit flips, random byte runs, inserted and deleted runs, duplicated runs, headers edited to declare
other (often huge) sizes -- with the PNG chunk CRC recomputed, so the decoder believes them -- and
splices of two seeds. ``mutants(seed, n)`` gives the same n mutants for the same seed."""

from __future__ import annotations

import io
import random
import struct
import zlib
from typing import Iterator

import numpy as np
from PIL import Image


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def seed_images() -> dict[str, bytes]:
    rng = np.random.default_rng(1234)
    base = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    frames = [Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)) for _ in range(3)]
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "jpeg": _enc(base, "JPEG", quality=85),
        "jpeg-progressive": _enc(base, "JPEG", quality=70, progressive=True),
        "jpeg-gray": _enc(base.convert("L"), "JPEG"),
        "jpeg-cmyk": _enc(base.convert("CMYK"), "JPEG"),
        "jpeg-exif": _enc(base, "JPEG", exif=exif),
        "png": _enc(base, "PNG"),
        "png-rgba": _enc(base.convert("RGBA"), "PNG"),
        "png-palette": _enc(base.convert("P"), "PNG"),
        "png-16bit": _enc(Image.fromarray(rng.integers(0, 65535, (20, 30)).astype(np.uint16)), "PNG"),
        "png-interlaced": _enc(base, "PNG", interlace=1) if _png_interlace_ok() else _enc(base, "PNG", optimize=True),
        "webp": _enc(base, "WEBP", quality=80),
        "webp-lossless": _enc(base, "WEBP", lossless=True),
        "webp-animated": _enc(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "gif-animated": _enc(frames[0].convert("P"), "GIF", save_all=True,
                             append_images=[f.convert("P") for f in frames[1:]]),
        "bmp": _enc(base, "BMP"),
        "tiff": _enc(base, "TIFF"),
    }


def _png_interlace_ok() -> bool:
    try:
        _enc(Image.new("RGB", (2, 2)), "PNG", interlace=1)
        return True
    except Exception:
        return False


# -- header edits: declare another size ------------------------------------------------------------

HUGE = (65500, 65500)


def _png_size(data: bytes, w: int, h: int) -> bytes:
    if data[12:16] != b"IHDR":
        return data
    body = struct.pack(">II", w, h) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return data[:16] + body + crc + data[33:]


def _jpeg_size(data: bytes, w: int, h: int) -> bytes:
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        i = data.find(marker)
        if i >= 0:
            w, h = min(w, 65535), min(h, 65535)
            return data[:i + 5] + struct.pack(">HH", h, w) + data[i + 9:]
    return data


def _gif_size(data: bytes, w: int, h: int) -> bytes:
    w, h = min(w, 65535), min(h, 65535)
    return data[:6] + struct.pack("<HH", w, h) + data[10:]


def _webp_size(data: bytes, w: int, h: int) -> bytes:
    kind = data[12:16]
    if kind == b"VP8X":  # canvas size minus one, 24 bits each
        w, h = max(1, min(w, 1 << 24)), max(1, min(h, 1 << 24))
        return data[:24] + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little") + data[30:]
    if kind == b"VP8L":  # 14 bits each, minus one
        w, h = max(1, min(w, 1 << 14)), max(1, min(h, 1 << 14))
        bits = int.from_bytes(data[21:25], "little")
        bits = (bits & ~0x0FFFFFFF) | ((w - 1) & 0x3FFF) | (((h - 1) & 0x3FFF) << 14)
        return data[:21] + bits.to_bytes(4, "little") + data[25:]
    if kind == b"VP8 ":  # 14 bits each (+2 scale bits)
        w, h = min(w, 0x3FFF), min(h, 0x3FFF)
        return data[:26] + struct.pack("<HH", w, h) + data[30:]
    return data


def _bmp_size(data: bytes, w: int, h: int) -> bytes:
    return data[:18] + struct.pack("<ii", min(w, 2 ** 31 - 1), min(h, 2 ** 31 - 1)) + data[26:]


SIZE_EDITS = {"png": _png_size, "jpeg": _jpeg_size, "gif": _gif_size, "webp": _webp_size, "bmp": _bmp_size}


def _family(name: str) -> str:
    return name.split("-")[0]


# -- mutations -------------------------------------------------------------------------------------

def _truncate(rng: random.Random, data: bytes, _seeds) -> bytes:
    return data[:rng.randrange(0, len(data))]


def _bitflips(rng: random.Random, data: bytes, _seeds) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 8, 32))):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _header_bitflips(rng: random.Random, data: bytes, _seeds) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 2, 3))):
        i = rng.randrange(min(len(b), 64))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _random_run(rng: random.Random, data: bytes, _seeds) -> bytes:
    i = rng.randrange(len(data))
    n = rng.choice((1, 4, 16, 64, 256))
    return data[:i] + rng.randbytes(n) + data[i + n:]


def _insert(rng: random.Random, data: bytes, _seeds) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + rng.randbytes(rng.choice((1, 3, 17, 300))) + data[i:]


def _delete(rng: random.Random, data: bytes, _seeds) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.choice((1, 2, 16, 128)):]


def _duplicate(rng: random.Random, data: bytes, _seeds) -> bytes:
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.choice((8, 64, 512)))
    return data[:j] + data[i:j] * rng.choice((1, 2, 20)) + data[j:]


def _splice(rng: random.Random, data: bytes, seeds: dict[str, bytes]) -> bytes:
    other = seeds[rng.choice(sorted(seeds))]
    return data[:rng.randrange(1, len(data))] + other[rng.randrange(0, len(other)):]


MUTATIONS = {"truncate": _truncate, "bitflips": _bitflips, "header_bitflips": _header_bitflips,
             "random_run": _random_run, "insert": _insert, "delete": _delete, "duplicate": _duplicate,
             "splice": _splice}


def mutants(seed: int, n: int | None = None) -> Iterator[tuple[str, str, bytes]]:
    """(seed image name, mutation name, bytes), deterministic for ``seed``; endless when ``n`` is
    None. About one in six is a size edit (huge, zero, or off by a little), the rest byte-level."""
    seeds = seed_images()
    names = sorted(seeds)
    rng = random.Random(seed)
    i = 0
    while n is None or i < n:
        i += 1
        name = rng.choice(names)
        data = seeds[name]
        edit = SIZE_EDITS.get(_family(name))
        if edit is not None and rng.random() < 1 / 6:
            w, h = rng.choice([HUGE, (0, 0), (1, 65500), (65500, 1), (20000, 9000), (4000, 4000),
                               (rng.randrange(1, 200), rng.randrange(1, 200))])
            yield name, f"size_{w}x{h}", edit(data, w, h)
            continue
        kind = rng.choice(sorted(MUTATIONS))
        out = data
        for _ in range(rng.choice((1, 1, 1, 2, 3))):  # sometimes stacked
            if out:
                out = MUTATIONS[kind](rng, out, seeds)
        yield name, kind, out
