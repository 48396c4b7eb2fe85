"""``--fast-decode`` (reduced-size JPEG decoding) against the exact path: its speed and how far
its pixels and scores move.

Decode speed: bytes -> model pixels (decode + open_clip's PIL preprocess) on the benchmark's
JPEGs, alternating exact, fast, exact, fast, exact. Deviation: the same images scored both ways
with the same model and heads (random weights: the score deviations say how much the input moves
a ViT-B/32, not what a trained head would make of it; the pixel deviation is model-free).
"""

from __future__ import annotations

import time

import numpy as np

from bench import data as bdata
from bench.measure import median, paired_ratios, rnd, say


def run(info: dict, heads: dict, images: int, batch: int) -> dict:
    from shardsmith.filters.clip import ClipSpec
    from shardsmith.filters.scorer import Scorer, ScorerSpec
    from shardsmith.filters.scores import BUILTIN, HeadSpec
    from shardsmith.pipelines.stages.decode import decode

    jpegs, captions = [], []
    for data, cap in bdata.iter_samples(info, 2):
        jpegs.append(data)
        captions.append(cap)
    jpegs, captions = jpegs[:images], captions[:images]
    spec = ScorerSpec(ClipSpec(bdata.CLIP_MODEL, None),
                      {s.name: HeadSpec(s.arch, heads[s.option]) for s in BUILTIN.values() if s.arch})
    scorer = Scorer(spec, device="cpu")
    pt, size = scorer.pixel_transform, scorer.embedder.image_size
    draft = size[::-1]

    def pixels(fast: bool) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        px = np.stack([decode(d, pt, draft_size=draft if fast else None).pixels for d in jpegs])
        return px, time.perf_counter() - t0

    exact_px, _ = pixels(False)  # warm-up
    exact_t, fast_t = [], []
    for i in range(3):
        exact_t.append(len(jpegs) / pixels(False)[1])
        if i < 2:
            fast_t.append(len(jpegs) / pixels(True)[1])
    fast_px, _ = pixels(True)
    speed = paired_ratios(fast_t, exact_t)
    say(f"  fast decode: {median(fast_t):.0f} images/s vs exact {median(exact_t):.0f} images/s "
        f"(x{median(speed):.2f})")
    a = scorer.score(exact_px, captions, fixed_batch=batch)
    b = scorer.score(fast_px, captions, fixed_batch=batch)
    cos = np.einsum("nd,nd->n", a["embedding"], b["embedding"])
    diff = np.abs(exact_px.astype(np.int16) - fast_px.astype(np.int16))
    dev = {name: {"max_abs": float(np.max(np.abs(a[name] - b[name]))),
                  "mean_abs": float(np.mean(np.abs(a[name] - b[name])))}
           for name in ("aesthetic", "pwatermark", "punsafe", "similarity")}
    return {
        "images": len(jpegs), "decode_images_per_s": {"exact": rnd(exact_t, 1), "fast": rnd(fast_t, 1)},
        "decode_speedup": round(median(speed), 3),
        "pixel_abs_diff": {"mean": round(float(diff.mean()), 3), "p99": float(np.percentile(diff, 99)),
                           "max": int(diff.max())},
        "embedding_cosine": {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)},
        "score_deviation": {k: {kk: round(vv, 6) for kk, vv in v.items()} for k, v in dev.items()},
        "note": "scores from a randomly initialised ViT-B-32 and random heads; default stays exact "
                "(scores equal open_clip's preprocess + forward)",
    }
