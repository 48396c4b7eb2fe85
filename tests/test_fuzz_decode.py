"""Fuzzed decoders: seeded mutations of JPEG/PNG/WebP/GIF/BMP/TIFF seeds (tests/fuzz_images.py)
through the real decode path (``stages/decode.py:decode_batch``, the Ray UDF, called on batches as
the reader builds them, with the tiny CLIP model's preprocess). Every outcome is a decoded image or
an error row of a known kind -- no exception escapes, no process dies -- and a decoded image never
declared more pixels than the limit (the work per image is bounded by it). Only the reader's
formats are opened at all.

This is the short, count-bounded run of ``make test``; ``python -m bench.fuzz_decode`` runs the
time-bounded campaign and records how long each image took (docs/reliability.md has its figures)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fuzz_images import HUGE, mutants, seed_images
from PIL import Image

from shardsmith.pipelines.stages.batch import sample_batch
from shardsmith.pipelines.stages.decode import decode_batch

pytestmark = pytest.mark.timeout(600)
KNOWN = {"decode_error", "image_too_large", "empty_image"}
MAX_PIXELS = 4_000_000  # what a user passes with --max-image-pixels; bench/ also runs Pillow's default


@pytest.fixture(scope="module")
def preprocess(tiny_models):
    from shardsmith.filters.clip import ClipEmbedder, ClipSpec

    e = ClipEmbedder(ClipSpec(tiny_models["clip_model"], tiny_models["clip_pretrained"]))
    return e.pixel_transform, e.image_size


def decode_all(images: list[bytes], preprocess, fast: bool) -> dict:
    transform, size = preprocess
    rows = [("00000", i, f"k{i}", data, "caption", None, None, None, -1) for i, data in enumerate(images)]
    return decode_batch(sample_batch(rows), transform, size, MAX_PIXELS, exif_transpose=False, fast=fast)


def check(out: dict, i: int, size) -> str:
    """The outcome of row ``i``: 'decoded' or its error kind; asserts it is a well-formed one."""
    kind = out["error_kind"][i]
    if kind is None:
        w, h = int(out["original_width"][i]), int(out["original_height"][i])
        assert w >= 1 and h >= 1 and w * h <= MAX_PIXELS, (w, h)
        assert out["pixels"][i].shape == (*size, 3) and out["pixels"][i].dtype == np.uint8
        return "decoded"
    assert kind in KNOWN, kind
    msg = out["error"][i]
    assert isinstance(msg, str) and msg and "\n" not in msg
    return kind


def test_every_seed_decodes(preprocess):
    seeds = seed_images()
    out = decode_all(list(seeds.values()), preprocess, fast=False)
    assert [check(out, i, preprocess[1]) for i in range(len(seeds))] == ["decoded"] * len(seeds)


def test_mutated_images_decode_or_become_error_rows_of_a_known_kind(preprocess):
    items = list(mutants(seed=2026, n=800))
    outcomes: dict[str, int] = {}
    huge = []
    for start in range(0, len(items), 40):  # read batches; every other one on the --fast-decode path
        chunk = items[start:start + 40]
        out = decode_all([data for _, _, data in chunk], preprocess, fast=(start // 40) % 2 == 1)
        assert len(out["error_kind"]) == len(chunk)
        for i, (name, mutation, _) in enumerate(chunk):
            got = check(out, i, preprocess[1])
            outcomes[got] = outcomes.get(got, 0) + 1
            if mutation == f"size_{HUGE[0]}x{HUGE[1]}" and name.split("-")[0] in ("png", "jpeg", "gif", "bmp"):
                huge.append((name, got))
    # both kinds of outcome happen: the mutants are neither all harmless nor all rejected
    assert outcomes.get("decoded", 0) >= 50 and outcomes.get("decode_error", 0) >= 100, outcomes
    assert outcomes.get("image_too_large", 0) >= 5, outcomes
    # a header declaring 65500 x 65500 is refused from the header, before any pixel is decoded
    assert huge and all(got == "image_too_large" for _, got in huge), huge


def _other_formats() -> dict[str, bytes]:
    im = Image.new("RGB", (16, 12), (10, 20, 30))
    out = {}
    for fmt in ("PPM", "ICO", "TGA", "PCX", "SGI", "IM", "DDS", "QOI"):
        buf = io.BytesIO()
        try:
            im.save(buf, format=fmt)
        except (KeyError, OSError, ValueError):
            continue
        out[fmt] = buf.getvalue()
    out["EPS"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 12\n%%EndComments\nshowpage\n"
    return out


def test_formats_the_reader_does_not_list_are_not_parsed(preprocess):
    """Pillow opens these (the EPS one would go to Ghostscript); the decode path does not."""
    from shardsmith.pipelines.formats.fetch import ImageCheckError, check_image

    others = _other_formats()
    assert len(others) >= 6, sorted(others)
    for fmt, data in others.items():
        assert Image.open(io.BytesIO(data)).format == fmt  # Pillow alone would parse it
    out = decode_all(list(others.values()), preprocess, fast=False)
    for i, fmt in enumerate(others):
        assert out["error_kind"][i] == "decode_error" and "not a recognised image format" in out["error"][i], fmt
        with pytest.raises(ImageCheckError) as e:  # nor does the URL fetcher's check
            check_image(others[fmt], 10 ** 8)
        assert e.value.kind == "not_an_image"
