"""The cost of LAION's watermark model (``--watermark-head laion-watermark-effnet``): a second
forward (timm EfficientNet-B3 at 256x256) beside the CLIP one, and a second preprocessing of the
same decoded image, against a run whose pwatermark is a CLIP head.

Side by side on the same JPEGs, in this process, alternating: decode (bytes -> CLIP pixels, or
CLIP pixels + the 256x256 squash) and score (CLIP forward + heads, or + the EfficientNet forward):
CLIP-head, effnet, CLIP-head, effnet, CLIP-head. The models are random (the real architectures and
FLOPs); the figures are speed only. Also the FLOPs per image of each model (torch's FlopCounterMode),
which say what the ratio is with ViT-L/14, the CLIP model the LAION heads need.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from bench import data as bdata
from bench.measure import median, paired_ratios, rnd, say


def flops(model, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model(x)
    return fc.get_total_flops() / len(x)


def run(info: dict, heads: dict, work: str, images: int, threads: int, batch: int) -> dict:
    from shardsmith.filters.clip import ClipSpec
    from shardsmith.filters.heads import WatermarkEffnet
    from shardsmith.filters.pixels import PixelInputTransform
    from shardsmith.filters.scorer import Scorer, ScorerSpec
    from shardsmith.filters.scores import HeadSpec, ScoreSet, declared_score
    from shardsmith.pipelines.stages.decode import decode

    torch.set_num_threads(threads)
    jpegs, captions = [], []
    for data, cap in bdata.iter_samples(info, 2):
        jpegs.append(data)
        captions.append(cap)
    jpegs, captions = jpegs[:images], captions[:images]
    effnet_path = os.path.join(work, "heads", "watermark_effnet_random.pt")
    if not os.path.exists(effnet_path):
        torch.manual_seed(0)
        torch.save(WatermarkEffnet().model.state_dict(), effnet_path)
    base_heads = {"aesthetic": HeadSpec("laion-aesthetic", heads["aesthetic_head"]),
                  "pwatermark": HeadSpec("probability", heads["watermark_head"]),
                  "punsafe": HeadSpec("laion-nsfw", heads["nsfw_head"])}
    clip = ClipSpec(bdata.CLIP_MODEL, None)
    base = Scorer(ScorerSpec(clip, base_heads), device="cpu")
    wm_heads = {**base_heads, "pwatermark": HeadSpec("laion-watermark-effnet", effnet_path)}
    wm_spec = ScorerSpec(clip, wm_heads, scores=ScoreSet.for_run([declared_score("pwatermark",
                                                                                 "laion-watermark-effnet")]))
    wm = Scorer(wm_spec, device="cpu")
    (col, pi), = wm_spec.pixel_inputs().items()
    extra = {col: PixelInputTransform(pi)}
    pt = base.pixel_transform

    def decode_all(with_input: bool):
        t0 = time.perf_counter()
        ds = [decode(d, pt, input_transforms=extra if with_input else None) for d in jpegs]
        px = np.stack([d.pixels for d in ds])
        inputs = {col: np.stack([d.inputs[col] for d in ds])} if with_input else None
        return px, inputs, len(jpegs) / (time.perf_counter() - t0)

    def score(scorer, px, inputs):
        t0 = time.perf_counter()
        scorer.score(px, captions, fixed_batch=batch, inputs=inputs)
        return len(px) / (time.perf_counter() - t0)

    px, _, _ = decode_all(False)
    px2, inputs, _ = decode_all(True)  # warm-up of both paths
    score(base, px, None)
    score(wm, px2, inputs)
    dec = {"clip_head": [], "effnet": []}
    sc = {"clip_head": [], "effnet": []}
    for i in range(3):
        dec["clip_head"].append(decode_all(False)[2])
        sc["clip_head"].append(score(base, px, None))
        if i < 2:
            dec["effnet"].append(decode_all(True)[2])
            sc["effnet"].append(score(wm, px2, inputs))
    score_ratio = paired_ratios(sc["effnet"], sc["clip_head"])
    decode_ratio = paired_ratios(dec["effnet"], dec["clip_head"])
    # end to end on one core's worth of work: decode + score per image, in seconds
    per_image = {k: 1 / median(dec[k]) + 1 / median(sc[k]) for k in dec}
    say(f"  watermark effnet: scoring {median(sc['effnet']):.1f} vs {median(sc['clip_head']):.1f} images/s "
        f"(x{median(score_ratio):.3f}), decoding {median(dec['effnet']):.0f} vs {median(dec['clip_head']):.0f} "
        f"images/s (x{median(decode_ratio):.3f})")
    import open_clip

    effnet_flops = flops(wm.pixel_heads["pwatermark"][1], torch.zeros(1, 3, 256, 256))
    clip_flops = {}
    for name in (bdata.CLIP_MODEL, "ViT-L-14-quickgelu"):
        m = open_clip.create_model(name, pretrained=None).visual.eval()
        clip_flops[name] = flops(m, torch.zeros(1, 3, 224, 224))
        del m
    return {
        "images": len(jpegs), "batch": batch, "threads": threads, "clip_model": bdata.CLIP_MODEL,
        "score_images_per_s": {k: rnd(v, 2) for k, v in sc.items()},
        "decode_images_per_s": {k: rnd(v, 1) for k, v in dec.items()},
        "score_throughput_ratio": round(median(score_ratio), 3),
        "decode_throughput_ratio": round(median(decode_ratio), 3),
        "seconds_per_image": {k: round(v, 5) for k, v in per_image.items()},
        "end_to_end_cost": round(per_image["effnet"] / per_image["clip_head"], 3),
        "gflops_per_image": {"laion-watermark-effnet@256": round(effnet_flops / 1e9, 2),
                             **{f"{k}@224": round(v / 1e9, 2) for k, v in clip_flops.items()}},
        "extra_pixels_bytes_per_image": 256 * 256 * 3,
        "note": "random weights; ratios of throughput with LAION's EfficientNet-B3 watermark model to a CLIP-head "
                "pwatermark, same images, alternated in one process",
    }
