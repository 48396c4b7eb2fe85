"""What a generation row's images become before the pipeline sees them: the source fitted to the
output size, masks (a file, or a strategy: ``random-box``, ``center``, ``border:PX``), the
outpainting canvas (``pad``), and control images from a detector (``canny``). Plain PIL, numpy
and OpenCV, no Ray, no model: every function is deterministic, so that KEY.json's parameters
rebuild the same inputs.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

MASK_STRATEGIES = ("random-box", "center", "border:PX")
DETECTORS = ("canny", "canny:LOW,HIGH")
_BORDER = re.compile(r"^border:(\d+)$")
_CANNY = re.compile(r"^canny(?::(\d+),(\d+))?$")
_PAD_SIDES = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*$")
_PAD_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


class ConditioningError(ValueError):
    """A row's image, mask, pad or control setting that cannot be applied (an error row)."""


def is_mask_strategy(value: str) -> bool:
    return value in ("random-box", "center") or bool(_BORDER.match(value))


def check_mask_strategy(value: str) -> str | None:
    """None if ``value`` is a mask strategy, else why not (for values that look like one)."""
    if value.startswith("border") and not _BORDER.match(value):
        return f"mask {value!r}: expected border:PX with PX a whole number of pixels"
    return None


def parse_detector(value: str) -> tuple[str, tuple[int, int]]:
    m = _CANNY.match(value)
    if not m:
        raise ConditioningError(f"control {value!r}: known detectors: {', '.join(DETECTORS)}")
    low, high = (int(m.group(1)), int(m.group(2))) if m.group(1) else (100, 200)
    if not 0 <= low <= high:
        raise ConditioningError(f"control {value!r}: needs 0 <= LOW <= HIGH")
    return "canny", (low, high)


def parse_pad(value: str) -> tuple[str, tuple[int, ...]]:
    """``"left,top,right,bottom"`` (pixels) or ``"WxH"`` (the canvas size, the source centred)."""
    m = _PAD_SIDES.match(value)
    if m:
        return "sides", tuple(int(v) for v in m.groups())
    m = _PAD_SIZE.match(value)
    if m:
        return "size", (int(m.group(1)), int(m.group(2)))
    raise ConditioningError(f"pad {value!r}: expected left,top,right,bottom (pixels) or WxH (the canvas size)")


def fit(img, size: tuple[int, int], resample=None):
    """``img`` at exactly ``size``: unchanged if it already is, else resized to cover it and
    center-cropped (``filters.augment.resize_cover``; LANCZOS, NEAREST for masks)."""
    from PIL import Image

    from shardsmith.filters.augment import resize_cover

    if img.size == tuple(size):
        return img
    return resize_cover(img, tuple(size), Image.Resampling.LANCZOS if resample is None else resample)


def natural_size(w: int, h: int) -> tuple[int, int]:
    """An image's own size rounded down to multiples of 8 (what the VAE takes)."""
    if w < 8 or h < 8:
        raise ConditioningError(f"image {w}x{h} is smaller than 8x8")
    return w // 8 * 8, h // 8 * 8


def _seed_rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"mask:{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def strategy_mask(strategy: str, size: tuple[int, int], seed: int, key: str):
    """A mask (L, 255 = repaint) of ``size`` made by ``strategy``: ``center`` (the middle half of
    each side), ``border:PX`` (a frame PX wide), ``random-box`` (a box of 1/4..1/2 of each side at
    a position drawn from the row's seed and key: the same row gets the same box)."""
    from PIL import Image

    w, h = size
    a = np.zeros((h, w), dtype=np.uint8)
    if strategy == "center":
        a[h // 4:h - h // 4, w // 4:w - w // 4] = 255
    elif strategy == "random-box":
        rng = _seed_rng(seed, key)
        bw, bh = int(rng.integers(max(1, w // 4), max(2, w // 2 + 1))), int(rng.integers(max(1, h // 4), max(2, h // 2 + 1)))
        x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        a[y:y + bh, x:x + bw] = 255
    else:
        m = _BORDER.match(strategy)
        if not m:
            raise ConditioningError(f"mask {strategy!r}: a path/URL or one of {', '.join(MASK_STRATEGIES)}")
        px = int(m.group(1))
        if px < 1 or 2 * px >= min(w, h):
            raise ConditioningError(f"mask {strategy}: the border must be 1..{(min(w, h) - 1) // 2} px for {w}x{h}")
        a[:, :] = 255
        a[px:h - px, px:w - px] = 0
    return Image.fromarray(a, mode="L")


def as_mask(img, size: tuple[int, int]):
    """A mask file as L, fitted to ``size`` (nearest neighbour: a mask stays a mask)."""
    from PIL import Image

    return fit(img.convert("L"), size, Image.Resampling.NEAREST)


def outpaint_canvas(img, pad: str):
    """(canvas, mask) for outpainting ``img``: the canvas extends it by ``pad`` with its edge pixels
    repeated outwards (a start the model repaints), the mask is 255 on the new border, 0 on the
    original. The canvas sides must be multiples of 8."""
    from PIL import Image

    kind, v = parse_pad(pad)
    w, h = img.size
    if kind == "sides":
        left, top, right, bottom = v
    else:
        tw, th = v
        if tw < w or th < h:
            raise ConditioningError(f"pad {pad!r}: the canvas is smaller than the image ({w}x{h})")
        left, top = (tw - w) // 2, (th - h) // 2
        right, bottom = tw - w - left, th - h - top
    cw, ch = w + left + right, h + top + bottom
    if cw % 8 or ch % 8:
        raise ConditioningError(f"pad {pad!r}: the canvas {cw}x{ch} is not a multiple of 8 on each side")
    if cw == w and ch == h:
        raise ConditioningError(f"pad {pad!r}: nothing to outpaint")
    a = np.asarray(img.convert("RGB"))
    canvas = np.pad(a, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full((ch, cw), 255, dtype=np.uint8)
    mask[top:top + h, left:left + w] = 0
    return Image.fromarray(canvas), Image.fromarray(mask, mode="L")


def control_image(detector: str, img):
    """The control image a detector makes from ``img`` (RGB, same size): ``canny`` is OpenCV's
    Canny edge map (thresholds 100, 200 unless ``canny:LOW,HIGH``) on the RGB pixels, stacked to
    three channels -- what diffusers' ControlNet examples feed the canny ControlNets."""
    import cv2
    from PIL import Image

    _, (low, high) = parse_detector(detector)
    edges = cv2.Canny(np.asarray(img.convert("RGB")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=2))
