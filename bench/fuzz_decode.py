"""``python -m bench.fuzz_decode``: the decoder fuzz campaign, seeded and time-bounded.

Mutants of small JPEG/PNG/WebP/GIF/BMP/TIFF seeds (tests/fuzz_images.py) go one at a time
through the real decode path (``stages/decode.py:decode_batch``, the decode stage's Ray UDF, with
a CLIP preprocess), with Pillow's default pixel limit and with a 4 MP one; each outcome is
classified (decoded, or an error kind) and timed. An exception escaping the decode path, or an
unknown error kind, is a failure; so is an image over the per-image bound (``--bound``, seconds).
Each figure is also given as a ratio to the time of decoding the unmutated seeds, measured
alternately in the same run (the machine may be shared). Writes ``--out`` (JSON) and the slowest
mutants' bytes to ``--keep`` for reproduction.

    python -m bench.fuzz_decode [--seconds 120] [--seed 1] [--bound 2.0] [--out bench/out/fuzz_decode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KNOWN = {"decode_error", "image_too_large", "empty_image"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=120.0, help="campaign length (default 120)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bound", type=float, default=2.0, help="seconds one image may take (default 2)")
    p.add_argument("--out", default=os.path.join(HERE, "out", "fuzz_decode.json"))
    p.add_argument("--keep", default=os.path.join(HERE, "out", "fuzz-slowest"))
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    import torch
    from fuzz_images import mutants, seed_images

    from shardsmith.filters.clip import ClipEmbedder, ClipSpec
    from shardsmith.jobs.tiny_models import make_tiny_models
    from shardsmith.pipelines.stages.batch import sample_batch
    from shardsmith.pipelines.stages.decode import DEFAULT_MAX_PIXELS, decode_batch

    torch.set_num_threads(1)
    models = make_tiny_models(tempfile.mkdtemp(prefix="fuzz-models-"))
    emb = ClipEmbedder(ClipSpec(models["clip_model"], models["clip_pretrained"]))
    size = emb.image_size

    def one(data: bytes, max_pixels: int, fast: bool) -> tuple[str, float]:
        batch = sample_batch([("00000", 0, "k", data, "c", None, None, None, -1)])
        t0 = time.perf_counter()
        out = decode_batch(batch, emb.pixel_transform, size, max_pixels, exif_transpose=False, fast=fast)
        dt = time.perf_counter() - t0
        kind = out["error_kind"][0]
        if kind is not None and kind not in KNOWN:
            raise AssertionError(f"unknown error kind {kind!r}")
        return kind or "decoded", dt

    seeds = list(seed_images().values())

    def seeds_time() -> float:
        t0 = time.perf_counter()
        for s in seeds:
            one(s, DEFAULT_MAX_PIXELS, False)
        return (time.perf_counter() - t0) / len(seeds)

    os.makedirs(args.keep, exist_ok=True)
    limits = {"default": DEFAULT_MAX_PIXELS, "4MP": 4_000_000}
    runs = {name: {"outcomes": {}, "by_mutation": {}, "times": [], "slowest": []} for name in limits}
    baseline = [seeds_time()]
    crashes: list[str] = []
    t_end = time.monotonic() + args.seconds
    n = 0
    for name, mutation, data in mutants(args.seed):
        if time.monotonic() > t_end:
            break
        n += 1
        for limit_name, limit in limits.items():
            r = runs[limit_name]
            try:
                kind, dt = one(data, limit, fast=n % 2 == 0)
            except Exception as e:  # the decode path let an exception out: a finding
                crashes.append(f"{limit_name} #{n} {name}/{mutation}: {type(e).__name__}: {e}")
                continue
            r["outcomes"][kind] = r["outcomes"].get(kind, 0) + 1
            m = r["by_mutation"].setdefault(mutation if not mutation.startswith("size_") else "size_edit", {})
            m[kind] = m.get(kind, 0) + 1
            r["times"].append(dt)
            r["slowest"] = sorted(r["slowest"] + [(dt, n, name, mutation, kind)], reverse=True)[:5]
            if dt > 0.2 and (dt, n, name, mutation, kind) in r["slowest"]:
                with open(os.path.join(args.keep, f"{limit_name}-{n}-{name}-{mutation}.bin"), "wb") as f:
                    f.write(data)
        if n % 200 == 0:
            baseline.append(seeds_time())
    baseline.append(seeds_time())
    base = statistics.median(baseline)
    doc = {"seed": args.seed, "seconds": args.seconds, "mutants": n, "bound_s": args.bound, "crashes": crashes,
           "seed_decode_s": round(base, 5), "machine_load": os.getloadavg(), "limits": {}}
    ok = not crashes
    for limit_name, r in runs.items():
        times = sorted(r["times"])
        worst = times[-1] if times else 0.0
        doc["limits"][limit_name] = {
            "max_pixels": limits[limit_name], "outcomes": r["outcomes"], "by_mutation": r["by_mutation"],
            "median_s": round(statistics.median(times), 5) if times else None,
            "p99_s": round(times[int(0.99 * (len(times) - 1))], 5) if times else None,
            "max_s": round(worst, 4), "max_over_seed_decode": round(worst / base, 1) if base else None,
            "over_bound": sum(t > args.bound for t in times),
            "slowest": [{"s": round(t, 4), "n": i, "seed": s, "mutation": m, "outcome": k}
                        for t, i, s, m, k in r["slowest"]]}
        ok = ok and doc["limits"][limit_name]["over_bound"] == 0
    doc["ok"] = ok
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps({k: v for k, v in doc.items() if k != "limits"}, indent=1))
    for limit_name, d in doc["limits"].items():
        print(limit_name, d["outcomes"], "median", d["median_s"], "p99", d["p99_s"], "max", d["max_s"],
              "over bound", d["over_bound"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
