"""The invisible watermark shardsmith puts on generated images, and its detector.

Like Stable Diffusion's own txt2img scripts, generated images carry an invisible watermark from
the ``invisible-watermark`` package, so that they can be recognised later (``curate
--detect-generated`` reports it as the ``generated`` column).

- method: ``dwtDctSvd`` (DWT + DCT + SVD; survived every test image here, plain ``dwtDct`` lost
  bits on some 256 px images),
- payload: the 6 ASCII bytes ``SSMTH1`` (48 bits, ``bytes`` mode),
- only images of at least 256x256 pixels can carry it (a limit of the package); smaller images
  are written without it and their json says so.
"""

from __future__ import annotations

import numpy as np

WATERMARK_METHOD = "dwtDctSvd"
WATERMARK_PAYLOAD = b"SSMTH1"
MIN_SIDE = 256


def can_carry(width: int, height: int) -> bool:
    return min(width, height) >= MIN_SIDE


def embed(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 RGB in, the same image with the payload embedded out."""
    from imwatermark import WatermarkEncoder

    enc = WatermarkEncoder()
    enc.set_watermark("bytes", WATERMARK_PAYLOAD)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    out = enc.encode(bgr, WATERMARK_METHOD)
    return np.ascontiguousarray(np.clip(out, 0, 255).astype(np.uint8)[:, :, ::-1])


def detect(rgb: np.ndarray) -> bool:
    """True when the image carries shardsmith's payload."""
    from imwatermark import WatermarkDecoder

    if not can_carry(rgb.shape[1], rgb.shape[0]):
        return False
    dec = WatermarkDecoder("bytes", len(WATERMARK_PAYLOAD) * 8)
    try:
        got = dec.decode(np.ascontiguousarray(rgb[:, :, ::-1]), WATERMARK_METHOD)
    except Exception:
        return False
    return got == WATERMARK_PAYLOAD


def describe() -> dict:
    return {"package": "invisible-watermark", "method": WATERMARK_METHOD,
            "payload": WATERMARK_PAYLOAD.decode("ascii"), "min_side": MIN_SIDE}
