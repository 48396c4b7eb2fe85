"""Reduced precision and compiled forwards: how far the scores move, and what compile buys.

Deviation: the benchmark's images scored by one model and heads (one Scorer: the same weights)
with the CLIP towers in fp32 and in bf16 (open_clip's own mixed precision, what curate runs), in
this process: the embeddings' cosine against fp32 (min, mean), the largest and mean absolute change of each score, and the
fraction of rows whose keep/drop decision flips -- under the ``laion-aesthetics-5plus`` preset, and
under the same rules with each threshold placed at its score's fp32 median (where the most rows
sit near the cut: the worst case). The model and heads have random weights: the score changes
say how much bf16 moves a ViT-B/32's output, not what a trained head makes of it.

Speed: the image tower at fp32, under ``torch.autocast`` bf16 and in open_clip's bf16, alternated
(why curate uses the last). Compile: ``torch.compile`` of the bf16 image tower at the fixed
forward size: the time to compile, the forward rate with and without, and whether it pays on a
typical shard (10,000 images).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa

from bench import data as bdata
from bench.measure import median, rnd, say

SHARD_IMAGES = 10_000  # an img2dataset shard


def _flips(a: dict, b: dict, rules: list[str]) -> float:
    from shardsmith.filters.rules import RuleSet

    rs = RuleSet.parse(rules)
    def keep(s):
        t = pa.table({k: pa.array(v.astype(np.float64)) for k, v in s.items() if k != "embedding"})
        return rs.apply(t).status_code == 0
    return float(np.mean(keep(a) != keep(b)))


def run(info: dict, heads: dict, images: int, batch: int) -> dict:
    import torch

    from shardsmith.filters.clip import ClipSpec, compiled_tower
    from shardsmith.filters.presets import preset_rules
    from shardsmith.filters.scorer import Scorer, ScorerSpec
    from shardsmith.filters.scores import BUILTIN, HeadSpec
    from shardsmith.pipelines.stages.decode import decode

    jpegs, captions = [], []
    for data, cap in bdata.iter_samples(info, max(1, -(-images // info["per_shard"]))):
        jpegs.append(data)
        captions.append(cap)
    jpegs, captions = jpegs[:images], captions[:images]
    spec = ScorerSpec(ClipSpec(bdata.CLIP_MODEL, None),
                      {s.name: HeadSpec(s.arch, heads[s.option]) for s in BUILTIN.values() if s.arch})
    scorers = {"fp32": Scorer(spec, device="cpu")}
    scorers["bf16"] = Scorer(dataclasses.replace(spec, precision="bf16"), device="cpu")
    scorers["bf16"].embedder.model.load_state_dict(scorers["fp32"].embedder.model.state_dict())  # same weights
    pixels = np.stack([decode(d, scorers["fp32"].pixel_transform).pixels for d in jpegs])

    def score(precision: str) -> dict:
        return scorers[precision].score(pixels, captions, fixed_batch=batch)

    say(f"precision: {len(jpegs)} images scored in fp32 and in bf16")
    a, b = score("fp32"), score("bf16")
    cos = np.einsum("nd,nd->n", a["embedding"], b["embedding"])
    names = [n for n in ("aesthetic", "pwatermark", "punsafe", "similarity") if n in a]
    dev = {n: {"max_abs": round(float(np.max(np.abs(a[n] - b[n]))), 6),
               "mean_abs": round(float(np.mean(np.abs(a[n] - b[n]))), 6)} for n in names}
    preset = preset_rules("laion-aesthetics-5plus")
    at_median = [f"{n} {'>=' if n == 'aesthetic' else '<'} {float(np.median(a[n])):.6g}"
                 for n in ("aesthetic", "pwatermark", "punsafe")]
    deviation = {
        "images": len(jpegs), "embedding_cosine_vs_fp32": {"min": round(float(cos.min()), 6),
                                                         "mean": round(float(cos.mean()), 6)},
        "score_abs_diff_vs_fp32": dev,
        "decision_flips": {"laion-aesthetics-5plus": _flips(a, b, preset), "thresholds_at_fp32_medians": _flips(
            a, b, at_median), "rules_at_medians": at_median},
        "note": "random-weight ViT-B-32 and random heads; the preset's thresholds may sit far from these random "
                "scores (then no row is near a cut): the median thresholds are the worst case",
    }
    say(f"  bf16 vs fp32: min cosine {cos.min():.6f}, flips at the preset {deviation['decision_flips']['laion-aesthetics-5plus']:.4f}, "
        f"at the medians {deviation['decision_flips']['thresholds_at_fp32_medians']:.4f}")

    # speed: the image tower at fp32, under autocast bf16, in open_clip's bf16 (alternated)
    x = scorers["fp32"].embedder.pixels_to_tensor(pixels[:batch])
    fp32_model, bf16 = scorers["fp32"].embedder.model, scorers["bf16"].embedder
    xb = x.to(bf16.input_dtype)

    def forward_rate(fn, n: int = 3) -> float:
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn()
            ts.append(time.perf_counter() - t0)
        return batch / median(ts)

    def autocast_forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fp32_model.encode_image(x)

    ways = {"fp32": lambda: fp32_model.encode_image(x), "autocast_bf16": autocast_forward,
            "open_clip_bf16": lambda: bf16.model.encode_image(xb)}
    rates: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(2):
        for k, fn in ways.items():
            fn()
            rates[k].append(forward_rate(fn))
    speed = {k: rnd(v, 2) for k, v in rates.items()}
    speed["what"] = (f"images/s of the image tower alone, batch {batch}, {torch.get_num_threads()} threads, twice "
                     "each, alternated: fp32; fp32 weights under torch.autocast(bf16); open_clip's precision='bf16' "
                     "(bf16 weights and activations, LayerNorm in fp32), which curate runs")
    say(f"  image tower: fp32 {median(rates['fp32']):.1f}, autocast bf16 {median(rates['autocast_bf16']):.1f}, "
        f"open_clip bf16 {median(rates['open_clip_bf16']):.1f} images/s")

    # compile: the bf16 image tower at the fixed forward size
    eager = forward_rate(lambda: bf16.model.encode_image(xb))
    compiled_fn = compiled_tower(bf16.model.encode_image)  # what curate --compile runs
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled_fn(xb)
    compile_s = time.perf_counter() - t0
    compiled = forward_rate(lambda: compiled_fn(xb))
    eager_again = forward_rate(lambda: bf16.model.encode_image(xb))
    eager_mean = (eager + eager_again) / 2
    saved_per_shard = SHARD_IMAGES / eager_mean - SHARD_IMAGES / compiled
    say(f"  compile: {compile_s:.1f} s to compile; image tower {eager_mean:.1f} -> {compiled:.1f} images/s")
    return {"precision_deviation": deviation, "precision_speed": speed,
            "compile": {"compile_seconds": round(compile_s, 2), "eager_images_per_s": rnd([eager, eager_again], 2),
                        "compiled_images_per_s": round(compiled, 2), "speedup": round(compiled / eager_mean, 3),
                        "seconds_saved_per_10k_image_shard": round(saved_per_shard, 1),
                        "pays_on_a_shard": bool(saved_per_shard > compile_s),
                        "what": "image tower only, open_clip bf16, fixed batch; compile time includes the first "
                                "compiled forward"}}
