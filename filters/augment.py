"""What augment does to a source sample before img2img: its target size (kept aspect ratio,
a fixed size, or SDXL-style aspect-ratio buckets), the resize and crop to it, and the
deterministic caption dropout. Plain PIL and hashlib, no Ray, no model."""

from __future__ import annotations

import hashlib
import math

BUCKET_RATIOS = (1.0, 9 / 7, 7 / 9, 19 / 13, 13 / 19, 7 / 4, 4 / 7, 12 / 5, 5 / 12)


def buckets_for_area(area: int) -> list[tuple[int, int]]:
    """(w, h) buckets of about ``area`` pixels; multiples of 64 (of 8 below 512x512)."""
    step = 64 if area >= 512 * 512 else 8
    out = []
    for r in BUCKET_RATIOS:
        w = max(step, round(math.sqrt(area * r) / step) * step)
        h = max(step, round(math.sqrt(area / r) / step) * step)
        out.append((w, h))
    return out


def target_size(w: int, h: int, size: tuple[int, int] | None = None, buckets: bool = False,
                bucket_area: int = 1024 * 1024, max_side: int = 512) -> tuple[int, int]:
    """A fixed ``size``; else the nearest of the buckets of ``bucket_area``; else the long side
    scaled to ``max_side``, both sides multiples of 8."""
    if size:
        return tuple(size)
    if buckets:
        ratio = w / h
        return min(buckets_for_area(bucket_area), key=lambda b: abs(math.log((b[0] / b[1]) / ratio)))
    scale = max_side / max(w, h)
    return max(8, int(w * scale) // 8 * 8), max(8, int(h * scale) // 8 * 8)


def resize_cover(img, size: tuple[int, int], resample=None):
    """Resize to cover ``size`` then center-crop to it exactly (LANCZOS unless ``resample``)."""
    from PIL import Image

    tw, th = size
    w, h = img.size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS if resample is None else resample)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


def caption_dropped(run_seed: int, key: str, p: float) -> bool:
    if p <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(f"dropout:{run_seed}:{key}".encode()).digest()[:8], "big")
    return h / 2**64 < p
