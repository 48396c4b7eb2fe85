"""``python -m bench.fetch_bounds``: how soon the fetcher's and the decoder's bounds cut a hostile
input, as ratios to a reference measured alternately in the same run (the timing assertions that
used to be in tests/test_fetch.py and tests/test_hostile_inputs.py; the tests assert the outcomes).

| figure | measured | reference | target |
|---|---|---|---|
| ``drip_cut_over_deadline`` | a body dripping 64 B / 0.1 s, cut | the configured deadline (2 s) | <= 1.5 |
| ``slow_cut_over_read_timeout`` | no header for 5 s, cut | the read timeout (1 s) | <= 1.5 |
| ``endless_cut_over_same_bytes`` | an endless body cut at max_bytes (1 MB) | a 1 MB image body, fetched | <= 3 |
| ``bomb_refusal_over_small_decode`` | a PNG declaring 30000x30000 refused | decoding a 48x32 JPEG | <= 5 |
| ``aspect_refusal_over_small_decode`` | a PNG declaring 1x65500 refused | decoding a 48x32 JPEG | <= 5 |

    python -m bench.fetch_bounds [--rounds 3] [--out bench/out/fetch_bounds.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import struct
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def png_header(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fetch_bounds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=os.path.join(HERE, "out", "fetch_bounds.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    from image_server import ImageServer
    from PIL import Image

    from shardsmith.filters.clip import ClipEmbedder, ClipSpec
    from shardsmith.jobs.tiny_models import make_tiny_models
    from shardsmith.pipelines.formats.fetch import Fetcher, FetchOptions
    from shardsmith.pipelines.stages.decode import DecodeError, decode

    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 30, 30)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    big = io.BytesIO()
    Image.effect_noise((600, 500), 80).convert("RGB").save(big, format="PNG")
    big = big.getvalue()[:1_000_000].ljust(1_000_000, b"\0")
    opts = FetchOptions(connect_timeout=1.0, read_timeout=1.0, deadline=2.0, max_bytes=1_000_000, retries=0,
                        allow_private_addresses=True)
    models = make_tiny_models(tempfile.mkdtemp(prefix="bounds-models-"))
    transform = ClipEmbedder(ClipSpec(models["clip_model"], models["clip_pretrained"])).pixel_transform

    def refuse(data):
        try:
            decode(data, transform, max_pixels=100_000_000)
        except DecodeError as e:
            assert e.kind == "image_too_large", e.kind

    figures: dict[str, list[float]] = {k: [] for k in ("drip_cut_over_deadline", "slow_cut_over_read_timeout",
                                                       "endless_cut_over_same_bytes", "bomb_refusal_over_small_decode",
                                                       "aspect_refusal_over_small_decode")}
    with ImageServer() as server, Fetcher(opts) as f:
        drip = server.add("/drip.jpg", "drip", jpeg * 40, pause=0.1)
        slow = server.add("/slow.jpg", "slow", jpeg, delay=5.0)
        endless = server.add("/endless.jpg", "endless")
        same = server.add("/same.png", "ok", big, "image/png")
        for _ in range(args.rounds):
            figures["drip_cut_over_deadline"].append(timed(lambda: f.fetch(drip)) / opts.deadline)
            figures["slow_cut_over_read_timeout"].append(timed(lambda: f.fetch(slow)) / opts.read_timeout)
            ref = timed(lambda: f.fetch(same))
            figures["endless_cut_over_same_bytes"].append(timed(lambda: f.fetch(endless)) / ref)
            small = timed(lambda: decode(jpeg, transform))
            figures["bomb_refusal_over_small_decode"].append(timed(lambda: refuse(png_header(30000, 30000))) / small)
            small = timed(lambda: decode(jpeg, transform))
            figures["aspect_refusal_over_small_decode"].append(timed(lambda: refuse(png_header(1, 65500))) / small)
    targets = {"drip_cut_over_deadline": 1.5, "slow_cut_over_read_timeout": 1.5, "endless_cut_over_same_bytes": 3.0,
               "bomb_refusal_over_small_decode": 5.0, "aspect_refusal_over_small_decode": 5.0}
    doc = {"rounds": args.rounds, "machine_load": os.getloadavg(), "figures": {}}
    ok = True
    for name, values in figures.items():
        med = statistics.median(values)
        doc["figures"][name] = {"median": round(med, 3), "values": [round(v, 3) for v in values],
                                "target": targets[name], "ok": med <= targets[name]}
        ok = ok and med <= targets[name]
    doc["ok"] = ok
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=1)
    print(json.dumps(doc, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
