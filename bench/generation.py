"""Figures: ``generate`` against a direct diffusers loop, and generate at bf16 against fp32.

- ``generation_efficiency``: generate / a direct diffusers loop (same pipeline, prompts, seeds,
  dtype, one image per pipeline call), in the sequence direct, bf16, direct, fp32, bf16, direct,
  fp32: each bf16 generate run is compared with the direct loops before and after it, and the
  figure is the median of the two ratios. Both sides use torch's default thread count (every
  core: what a plain process gets, and what generate's actors use by default).
- ``generation_speedup_bf16``: generate at bfloat16 / generate at float32, same images: the
  second bf16 run of that sequence against the fp32 runs before and after it.

generate is timed end to end (``run_generate()``: prompt table, plan, actor start and pipeline
load, the images, PNG encoding, shard writing and commit) on an already-running Ray, with
``--no-watermark`` (the direct loop does not watermark). 256 px images, 12 steps, 80 images a
run, so that a run is mostly model, as a real run is: the actor's start (a process importing
torch and diffusers, ~5 s, of which peft and torch._dynamo, which diffusers imports, ~2 s) and
the pipeline load are paid once per run, 6-8 s here. ``fixed_overhead_s`` is that cost as
measured, and ``bound_at_this_size`` the efficiency it leaves at this many images even if
generate made each image as fast as the direct loop (at 40 images, the size until 2026-12-04,
it was 0.86).
"""

from __future__ import annotations

import os
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.measure import figure, median, paired_ratios, rnd, say

PROMPTS = ["a watercolor of a lighthouse at dusk", "a red bicycle in the rain", "a bowl of fruit, oil painting",
           "a snowy cabin in a forest", "a city street at night, photo", "a field of sunflowers",
           "a sleeping cat on a sofa", "a wooden boat on a lake"]


def prompt_table(path: str, n: int) -> list[dict]:
    rows = [{"key": f"p{i:04d}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def run(sd_dir: str, work: str, images: int, direct_images: int, steps: int, size: int, batch: int = 4) -> dict:
    from shardsmith.filters.diffusion import Diffuser, DiffusionSpec
    from shardsmith.pipelines.config.generate import GenerateConfig
    from shardsmith.pipelines.flows.generate import run_generate
    from shardsmith.pipelines.formats.prompts import Defaults

    os.makedirs(work, exist_ok=True)
    rows = prompt_table(os.path.join(work, "prompts.parquet"), images)
    threads = torch.get_num_threads()  # torch's default, as in generate's actors
    say(f"generation: loading the pipeline for the direct loop ({steps} steps, {size}x{size}, {threads} threads)")
    diffuser = Diffuser(DiffusionSpec(sd_dir, dtype="bfloat16"))
    guidance = 7.5

    def direct(chunk: list[dict]) -> float:
        t0 = time.perf_counter()
        for r in chunk:
            diffuser.txt2img(r["prompt"], None, r["seed"], steps, guidance, size, size)
        s = time.perf_counter() - t0
        say(f"  direct diffusers loop: {len(chunk)} images in {s:.1f} s = {len(chunk) / s:.3f} images/s")
        return len(chunk) / s

    def generate(dtype: str = "bfloat16") -> float:
        out = os.path.join(work, "gen-out")
        shutil.rmtree(out, ignore_errors=True)
        cfg = GenerateConfig(output=out, model=sd_dir, prompts=os.path.join(work, "prompts.parquet"), dtype=dtype,
                             batch_size=batch, shard_size=max(1, images // 2), watermark=False, progress=False,
                             defaults=Defaults(num_inference_steps=steps, guidance_scale=guidance, width=size,
                                               height=size))
        t0 = time.perf_counter()
        stats = run_generate(cfg, log=lambda *a: None)
        s = time.perf_counter() - t0
        assert stats["generated"] == images, stats
        shutil.rmtree(out, ignore_errors=True)
        say(f"  generate ({dtype}): {images} images in {s:.1f} s = {images / s:.3f} images/s")
        return images / s

    diffuser.txt2img(rows[0]["prompt"], None, 0, 1, guidance, size, size)  # warm-up
    # direct, bf16, direct, fp32, bf16, direct, fp32: each bf16 run sits between two direct loops
    # (generation_efficiency) and the second one also between the two fp32 runs (the speedup)
    d = [direct(rows[:direct_images])]
    g = [generate()]
    d.append(direct(rows[direct_images:2 * direct_images]))
    fp32 = [generate("float32")]
    g.append(generate())
    d.append(direct(rows[2 * direct_images:3 * direct_images]))
    fp32.append(generate("float32"))
    ratios = paired_ratios(g, d)
    bf16 = g[1:]
    speedup = paired_ratios(bf16, fp32)
    # what generate spends beyond the direct loop's time for the same images: actor start (a new
    # process importing torch and diffusers) and the pipeline load, once per run
    overhead = median([images / r - images / ((d[i] + d[i + 1]) / 2) for i, r in enumerate(g)])
    return {"generation_efficiency": figure(
        median(ratios), 0.90, ratios=rnd(ratios, 4), generate_images_per_s=rnd(g, 4),
        direct_diffusers_images_per_s=rnd(d, 4), images=images, direct_images_per_measurement=direct_images,
        pipeline="SD 1.x-style, random weights: UNet 64/128/192 channels (15.8 M parameters), tiny VAE and "
                 "text encoder, DDIM", steps=steps, size=f"{size}x{size}", guidance_scale=guidance,
        torch_threads=threads, actor_batch_size=batch, fixed_overhead_s=round(overhead, 2),
        bound_at_this_size=round(1 / (1 + overhead * median(d) / images), 4),
        what="generate images/s / direct diffusers loop images/s (pipe(prompt, generator=Generator('cpu')"
             ".manual_seed(seed)) per image), both bfloat16 with torch's default threads, alternating direct, "
             "generate, direct, (fp32), generate, direct",
        included="run_generate() wall time: prompt table, plan, actor start + pipeline load, images, PNG, "
                 "shards, commit; Ray already running; --no-watermark"),
        "generation_speedup_bf16": figure(
            median(speedup), 1.5, ratios=rnd(speedup, 4), bf16_images_per_s=rnd(bf16, 4), fp32_images_per_s=rnd(fp32, 4),
            images=images, steps=steps, size=f"{size}x{size}",
            what="generate end to end at --dtype bfloat16 / at --dtype float32, same images and seeds, alternating "
                 "fp32, bf16, fp32 (the second bf16 run of the efficiency sequence)")}


def unet_compile(sd_dir: str, steps: int, size: int, images: int = 6) -> dict:
    """``extras.unet_compile``: the bf16 pipeline with its UNet compiled (``generate --compile``)
    against the same pipeline eager, called directly in this process with torch's default threads,
    alternating eager, compiled, eager on the same prompts and seeds. The first compiled call pays
    the compile; ``break_even_images`` is how many images an actor must make before the compile
    has paid for itself (None: it never does). The deviation is the largest pixel difference
    between the two sides' images (0-255)."""
    import numpy as np

    from shardsmith.filters.diffusion import Diffuser, DiffusionSpec

    rows = [(PROMPTS[i % len(PROMPTS)], 2000 + i) for i in range(images)]
    guidance = 7.5
    say(f"extra: generate --compile, the UNet compiled vs eager ({steps} steps, {size}x{size}, bf16)")
    sides = {"eager": Diffuser(DiffusionSpec(sd_dir, dtype="bfloat16")),
             "compiled": Diffuser(DiffusionSpec(sd_dir, dtype="bfloat16", compile=True))}

    def one(side: str, prompt: str, seed: int):
        return sides[side].txt2img(prompt, None, seed, steps, guidance, size, size)

    t0 = time.perf_counter()
    one("eager", *rows[0])
    eager_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    one("compiled", *rows[0])
    compiled_first = time.perf_counter() - t0
    say(f"  first image: eager {eager_first:.1f} s, compiled {compiled_first:.1f} s (the compile)")
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    made: dict[str, list] = {"eager": [], "compiled": []}
    for side in ("eager", "compiled", "eager"):
        t0 = time.perf_counter()
        out = [one(side, p, s) for p, s in rows]
        rates[side].append(images / (time.perf_counter() - t0))
        made[side] = made[side] or out
        say(f"  {side}: {images} images at {rates[side][-1]:.3f} images/s")
    eager_s = 1 / median(rates["eager"])
    compiled_s = 1 / rates["compiled"][0]
    compile_s = compiled_first - eager_first
    gain = eager_s - compiled_s
    diff = max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
               for a, b in zip(made["eager"], made["compiled"]))
    return {"unet_compile": {
        "speedup": rnd(eager_s / compiled_s, 4), "eager_images_per_s": rnd(rates["eager"], 4),
        "compiled_images_per_s": rnd(rates["compiled"], 4), "compile_seconds": round(compile_s, 1),
        "break_even_images": round(compile_s / gain) if gain > 0 else None, "max_pixel_difference": diff,
        "images": images, "steps": steps, "size": f"{size}x{size}", "torch_threads": torch.get_num_threads(),
        "what": "the bf16 pipeline called directly with its UNet torch.compile'd (dynamic=False) / the same pipeline "
                "eager, alternating eager, compiled, eager; compile_seconds: the first compiled image's time over "
                "the first eager image's"}}
