"""The decode stage (CPU tasks): image bytes -> model pixels, every failure a specific error kind.

Reads SAMPLE columns, writes DECODED ones (``stages/batch.py``): ``image`` is replaced by
``pixels`` (the PIL half of the model's preprocess), ``original_width/height``, ``generated``,
the dedup fingerprints ``sha256`` (of the bytes) and ``phash`` (64-bit pHash, ``filters/fingerprint.py``),
and, when the run has a model that reads pixels of its own (LAION's watermark classifier), its
input too (``pixels_NAME``), made from the same decoded image. Runs next to the reader, or in the
scoring actor on CPU; decoded full-size images never leave ``decode``, only the model-sized uint8
pixels do.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from shardsmith.filters.fingerprint import phash, sha256_hex
from shardsmith.pipelines.formats.tar import PIL_FORMATS
from shardsmith.pipelines.stages.batch import SENTINEL, text, text_columns

# EXIF orientations 5-8 swap width and height when displayed.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own default decompression-bomb limit


class DecodeError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class Decoded:
    pixels: np.ndarray  # uint8 (H, W, 3), model size
    width: int  # original size as displayed (EXIF orientation applied)
    height: int
    generated: bool | None = None  # carries shardsmith's invisible watermark (when asked)
    phash: int | None = None  # 64-bit pHash of the image as decoded (filters/fingerprint.py)
    inputs: dict | None = None  # column -> uint8 pixels of a model that reads its own (when asked)


def decode(data: bytes, pixel_transform, max_pixels: int = DEFAULT_MAX_PIXELS,
           exif_transpose: bool = False, detect_generated: bool = False,
           draft_size: tuple[int, int] | None = None, input_transforms: dict | None = None) -> Decoded:
    """Decode ``data`` and apply the PIL half of the model's preprocess.

    The declared size is checked against ``max_pixels`` before any pixel is decoded, so a
    decompression bomb is refused without allocating it; so is the size the model's resize would
    make of it (``PixelTransform.work_pixels``: a 1 x 65500 image resized to a shortest side of 224
    would be 3.3 G pixels). Animated images use their first frame.
    With ``exif_transpose`` the pixels are rotated as EXIF says before scoring; by default they
    are scored as stored, which is what ``preprocess(Image.open(f))`` computes.

    ``draft_size`` (curate ``--fast-decode``): a JPEG is decoded at a reduced scale (libjpeg's DCT
    scaling, 1/2 to 1/8) that still covers ``draft_size`` on both sides, then preprocessed as
    usual: several times less decoding work on large images, pixels that differ slightly from the
    exact path (bench/ measures how much). The original size is still the stored image's. Not
    applied when looking for the invisible watermark, which needs the full image.

    ``input_transforms`` (column -> PIL transform): the inputs of models that read pixels of their
    own, made from the same decoded image (``filters/pixels.py``).
    """
    if not data:
        raise DecodeError("empty_image", "image member is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError as e:
        raise DecodeError("image_too_large", str(e)) from e
    except Image.UnidentifiedImageError as e:
        raise DecodeError("decode_error", f"not a recognised image format (first bytes: {data[:8].hex()})") from e
    except Exception as e:
        raise DecodeError("decode_error", f"not a readable image: {type(e).__name__}: {e}") from e
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError("image_too_large",
                          f"declared size {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    if w < 1 or h < 1:
        raise DecodeError("decode_error", f"image has an empty size {w}x{h}")
    work = getattr(pixel_transform, "work_pixels", None)
    resized = work(w, h) if work is not None else w * h
    # an extreme aspect ratio: the model's resize would be the bomb. Bounded by the larger of the
    # limit and Pillow's default: a small --max-image-pixels is a policy on stored sizes, and
    # upscaling a small image to the model's size is not a bomb.
    resize_limit = max(max_pixels, DEFAULT_MAX_PIXELS)
    if resized > resize_limit:
        raise DecodeError("image_too_large",
                          f"size {w}x{h} (aspect ratio {max(w, h) / min(w, h):.0f}:1): the model's resize would make "
                          f"{resized} pixels, over the limit of {resize_limit}")
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if draft_size is not None and not detect_generated and img.format == "JPEG":
                img.draft("RGB", draft_size)
            img.load()
            if exif_transpose and orientation != 1:
                img = ImageOps.exif_transpose(img)
            pixels = pixel_transform(img)
            fingerprint = phash(img)
            inputs = {c: t(img) for c, t in input_transforms.items()} if input_transforms else None
            generated = None
            if detect_generated:
                from shardsmith.filters.watermark import detect

                generated = detect(np.asarray(img.convert("RGB")))
    except Exception as e:
        raise DecodeError("decode_error", f"cannot decode image ({img.format or 'unknown format'} "
                                          f"{w}x{h}, mode {img.mode}): {type(e).__name__}: {e}") from e
    if orientation in _SWAPPING_ORIENTATIONS:
        w, h = h, w
    return Decoded(pixels=pixels, width=w, height=h, generated=generated, phash=fingerprint, inputs=inputs)


def decode_batch(batch: dict, pixel_transform, image_size: tuple[int, int], max_pixels: int,
                 exif_transpose: bool, detect_generated: bool = False, fast: bool = False,
                 pixel_inputs: dict | None = None, pool=None) -> dict:
    """Ray Data UDF (CPU tasks), or called by a scoring actor that decodes its own images: image
    bytes -> model-size uint8 pixels + original size. ``fast``: reduced-size JPEG decoding
    (``--fast-decode``, see decode). ``pixel_inputs`` (column -> ``filters.scores.PixelInput``):
    the extra pixel columns of the run, if any. ``pool``: a thread pool the rows are decoded in
    (Pillow releases the GIL while it decodes and resizes); the result is the same."""
    transforms = None
    if pixel_inputs:
        from shardsmith.filters.pixels import PixelInputTransform

        transforms = {c: PixelInputTransform(pi) for c, pi in pixel_inputs.items()}
    sizes = [image_size] + [tuple(pi.size) for pi in (pixel_inputs or {}).values()]
    draft_size = (max(s[1] for s in sizes), max(s[0] for s in sizes)) if fast else None  # PIL: (width, height)
    n = len(batch["row"])
    pixels = np.zeros((n, *image_size, 3), dtype=np.uint8)
    extra = {c: np.zeros((n, *pi.size, 3), dtype=np.uint8) for c, pi in (pixel_inputs or {}).items()}
    width = np.full(n, -1, dtype=np.int64)
    height = np.full(n, -1, dtype=np.int64)
    generated = np.full(n, -1, dtype=np.int8)  # -1 = not known
    # dedup fingerprints: sha256 of every image member's bytes, pHash of every decoded image (0
    # where not decoded: results_table makes it null with the size)
    sha256 = np.array([None] * n, dtype=object)
    phashes = np.zeros(n, dtype=np.int64)
    kinds = list(batch["error_kind"])
    errors = list(batch["error"])

    def one(i: int) -> None:
        if batch["image"][i]:
            sha256[i] = sha256_hex(batch["image"][i])
        try:
            d = decode(batch["image"][i], pixel_transform, max_pixels, exif_transpose, detect_generated, draft_size,
                       transforms)
        except DecodeError as e:
            kinds[i], errors[i] = e.kind, e.message
            return
        pixels[i], width[i], height[i], phashes[i] = d.pixels, d.width, d.height, d.phash
        for c in extra:
            extra[c][i] = d.inputs[c]
        if d.generated is not None:
            generated[i] = int(d.generated)

    todo = [i for i in range(n) if batch["row"][i] != SENTINEL and text(kinds[i]) is None]
    if pool is None:
        for i in todo:
            one(i)
    else:
        list(pool.map(one, todo))
    out = {k: v for k, v in batch.items() if k != "image"}
    out.update(pixels=pixels, original_width=width, original_height=height, generated=generated,
               sha256=sha256, phash=phashes, error_kind=np.array(kinds, dtype=object), error=np.array(errors, dtype=object),
               **extra)
    return text_columns(out)
