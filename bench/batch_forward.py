"""Extra: what ``generate --batch-forward`` gains on CPU. The same images made by per-image calls
(the default: one pipeline call and one generator per image) and by batched forwards (one call
for B images with B generators, ``Diffuser.run`` with B requests), alternating per-image,
batched, per-image, ...; each batched rate compared with the mean of the per-image rates around
it, the figure being the median. Only the model's work is timed (no Ray, no PNG): the pipeline
is loaded once, warmed up, and both sides use the same torch threads.

    python -m bench.batch_forward [--work bench/out] [--size 128] [--steps 8] [--images 16]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bench.measure import median, paired_ratios, rnd, say

PROMPTS = ["a watercolor of a lighthouse at dusk", "a red bicycle in the rain", "a bowl of fruit, oil painting",
           "a snowy cabin in a forest", "a city street at night, photo", "a field of sunflowers",
           "a sleeping cat on a sofa", "a wooden boat on a lake"]


def run(sd_dir: str, images: int = 16, steps: int = 8, size: int = 128, batches=(4, 8), threads: int = 1,
        repeats: int = 2) -> dict:
    from shardsmith.filters.diffusion import Diffuser, DiffusionSpec, Request

    torch.set_num_threads(threads)
    dif = Diffuser(DiffusionSpec(sd_dir))
    reqs = [Request("txt2img", PROMPTS[i % len(PROMPTS)], None, 1000 + i, steps, 7.5, size, size) for i in range(images)]
    dif.run(reqs[:1])  # warm-up
    dif.run(reqs[:batches[0]])

    def rate(b: int) -> float:
        t0 = time.perf_counter()
        for i in range(0, images, b):
            dif.run(reqs[i:i + b])  # b == 1: the default, one call per image
        s = time.perf_counter() - t0
        say(f"  batch {b}: {images} images in {s:.1f} s = {images / s:.3f} images/s")
        return images / s

    out = {}
    for b in batches:
        single, batched = [rate(1)], []
        for _ in range(repeats):
            batched.append(rate(b))
            single.append(rate(1))
        ratios = paired_ratios(batched, single)
        out[f"batch_{b}"] = {"gain": round(median(ratios), 4), "ratios": rnd(ratios, 4),
                             "batched_images_per_s": rnd(batched, 4), "per_image_images_per_s": rnd(single, 4)}
    unet = sum(p.numel() for p in dif.t2i.unet.parameters())
    return {"batch_forward": {
        **out, "images": images, "steps": steps, "size": f"{size}x{size}", "torch_threads": threads,
        "guidance_scale": 7.5, "unet_params": unet, "device": "cpu",
        "what": "images/s of Diffuser.run with B requests (one call, B generators) / images/s of one call per "
                "image, same images and seeds, alternating; model time only (no Ray, no PNG)"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batch_forward", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--work", default=os.path.join(here, "out"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", default="4,8")
    p.add_argument("--out", help="write the result JSON here too")
    args = p.parse_args(argv)
    from bench import data as bdata

    sd_dir = bdata.make_sd_pipeline(os.path.join(args.work, "sd-bench"))
    res = run(sd_dir, args.images, args.steps, args.size, tuple(int(b) for b in args.batches.split(",")), args.threads)
    res["batch_forward"]["load_average_end"] = list(os.getloadavg())
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
