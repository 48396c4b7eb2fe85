"""``make bench`` / ``python -m bench.run``: measure where shardsmith's time goes, as ratios.

Builds the inputs (cached in ``bench/out/``), starts one local Ray the way ``shardsmith curate``
does, then measures, each side by side with its reference on the same data:

1. speedup_vs_fp32_bare, node_efficiency, scoring_efficiency, speedup_vs_single_purpose,
   memory_growth_10x                                                       (bench/scoring.py)
2. generation_efficiency, generation_speedup_bf16                          (bench/generation.py)
3. metadata_filter_rows_per_s                                              (bench/metadata_filter.py)
4. scale_out_2_nodes, on its own pinned local clusters                     (bench/scaleout.py)
5. dedup_driver_memory_10x, dedup_semantic_recall (+ rows/s per method)    (bench/dedup.py)
6. recurate_rows_per_s: recurate vs the curate run it re-decides          (bench/recurate.py)
7. cli_help_seconds: ``shardsmith [SUBCOMMAND] --help`` as a new process  (bench/cli_help.py)

plus ``--fast-decode``'s speed and deviation (bench/fast_decode.py), bf16's deviation and
``torch.compile``'s gain (bench/precision.py), ``generate --compile``'s (bench/generation.py),
and the cost of LAION's watermark model, a second forward on its own input
(bench/watermark_effnet.py). Writes ``bench/results.json`` and
``bench/results.md`` after every figure; exits 1 when a figure misses its target or fails.

    python -m bench.run [--only cli,scoring,metadata,generation,batch_forward,fast_decode,precision,watermark,recurate,
                             scaleout,dedup] [--quick]
    python -m bench.run --gpu     # the GPU plan (bench/gpu.py): skips, saying so, without CUDA

``--quick`` shrinks everything to check that the harness runs (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

HERE = os.path.dirname(os.path.abspath(__file__))

# Sized so that the whole run takes ~20 minutes on 2 cores, and each 10x curate run is long enough
# (~1 minute at bf16) for its fixed costs (actor start and model load, ~6 s) to be a few percent.
SIZES = {
    "default": {"shards": 10, "per_shard": 192, "meta_files": 4, "meta_rows": 1_000_000, "gen_images": 80,
                "gen_direct": 10, "gen_compile_images": 6, "gen_steps": 12, "gen_size": 256, "scaleout_shards": 4,
                "fast_images": 64, "dedup_rows": 50_000, "dedup_dim": 64, "dedup_rate_rows": 100_000,
                "dedup_rate_dim": 768},
    "quick": {"shards": 2, "per_shard": 64, "meta_files": 2, "meta_rows": 100_000, "gen_images": 4,
              "gen_direct": 1, "gen_compile_images": 2, "gen_steps": 2, "gen_size": 64, "scaleout_shards": 2,
              "fast_images": 64, "dedup_rows": 2_000, "dedup_dim": 32, "dedup_rate_rows": 4_000,
              "dedup_rate_dim": 64},
}
STEPS = ("cli", "scoring", "metadata", "generation", "batch_forward", "fast_decode", "precision", "watermark",
         "recurate", "scaleout", "dedup")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes: check the harness, not the figures")
    p.add_argument("--out", default=HERE, help="where results.json and results.md go (default bench/)")
    p.add_argument("--work", default=os.path.join(HERE, "out"), help="cached inputs and scratch (default bench/out)")
    p.add_argument("--gpu", action="store_true", help="the GPU plan only (bench/gpu.py; needs CUDA, else skips)")
    p.add_argument("--gpu-decode", action="store_true", help="with --gpu: also decode JPEGs on the GPU")
    args = p.parse_args(argv)
    if args.gpu:
        from bench import gpu

        return gpu.main(args.out, args.work, gpu_decode=args.gpu_decode, quick=args.quick)
    steps = [s.strip() for s in args.only.split(",")] if args.only else list(STEPS)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {unknown}; known: {', '.join(STEPS)}")
    size = SIZES["quick" if args.quick else "default"]

    from bench import data as bdata
    from bench.measure import say
    from bench.results import Results

    results = Results(args.out)
    results.doc["sizes"] = {"name": "quick" if args.quick else "default", **size}
    os.makedirs(args.work, exist_ok=True)
    say(f"inputs in {args.work} (built once, then reused)")
    images = heads = None
    if set(steps) - {"dedup"}:  # dedup writes its own synthetic inputs
        images = bdata.make_image_shards(os.path.join(args.work, f"images-{size['shards']}x{size['per_shard']}"),
                                         size["shards"], size["per_shard"])
        heads = bdata.make_heads(os.path.join(args.work, "heads"))
        results.doc["dataset"]["images"] = images
    if "metadata" in steps:
        meta = bdata.make_metadata(os.path.join(args.work, f"meta-{size['meta_files']}x{size['meta_rows']}"),
                                   size["meta_files"], size["meta_rows"])
        results.doc["dataset"]["metadata"] = {k: v for k, v in meta.items() if k != "paths"}
    if "generation" in steps or "batch_forward" in steps:
        sd_dir = bdata.make_sd_pipeline(os.path.join(args.work, "sd-bench"))
    results.save()

    def attempt(name: str, fn) -> None:
        try:
            out = fn()
            results.add(out)
        except Exception:
            results.doc["errors"][name] = traceback.format_exc()
            results.save()
            say(f"{name}: FAILED\n{traceback.format_exc()}")

    if "cli" in steps:
        from bench import cli_help

        say("figure 8: shardsmith --help and every subcommand's --help, as new processes")
        attempt("cli", lambda: cli_help.run(3 if args.quick else 7))
    local = [s for s in steps if s not in ("scaleout", "cli")]
    if local:
        from shardsmith.pipelines.core.resources import node_cpus, plan_resources, ray_session

        t0 = time.perf_counter()
        with ray_session():
            results.doc["extras"]["ray_start_s"] = round(time.perf_counter() - t0, 2)
            import ray

            cpus = float(ray.cluster_resources().get("CPU", 1))
            plan = plan_resources(cpus, 0.0, nodes=node_cpus())
            results.doc["extras"]["plan"] = plan.describe()
            batch = 64
            say(f"local Ray up in {results.doc['extras']['ray_start_s']} s; curate's plan here: {plan.describe()}")
            if "scoring" in steps:
                from bench import scoring

                say("figures: curate vs the bare fp32 loop, the node's ceiling, the bare models, single-purpose "
                    "tools; memory at 1x and 10x")
                attempt("scoring", lambda: scoring.run(images, heads, args.work, batch, quick=args.quick))
            if "metadata" in steps:
                from bench import metadata_filter

                say("figure 5: metadata-only curate vs one pyarrow filter")
                attempt("metadata", lambda: metadata_filter.run(meta, args.work))
            if "generation" in steps:
                from bench import generation

                say("figures: generate vs a direct diffusers loop; generate at bf16 vs fp32")
                attempt("generation", lambda: generation.run(sd_dir, args.work, size["gen_images"],
                                                             size["gen_direct"], size["gen_steps"], size["gen_size"]))

                def uc():
                    results.doc["extras"].update(generation.unet_compile(sd_dir, size["gen_steps"], size["gen_size"],
                                                                         size["gen_compile_images"]))
                    return {}  # an extra, not a figure

                attempt("unet_compile", uc)
            if "batch_forward" in steps:
                from bench import batch_forward

                say("extra: --batch-forward (one call for B images) vs one call per image, model time only")

                def bf():
                    results.doc["extras"].update(batch_forward.run(
                        sd_dir, 4 if args.quick else 16, size["gen_steps"], size["gen_size"] if args.quick else 128,
                        batches=(2,) if args.quick else (4, 8)))
                    return {}

                attempt("batch_forward", bf)
            if "fast_decode" in steps:
                from bench import fast_decode

                say("extra: --fast-decode speed and deviation")

                def fd():
                    results.doc["extras"]["fast_decode"] = fast_decode.run(images, heads, size["fast_images"], batch)
                    return {}

                attempt("fast_decode", fd)
            if "precision" in steps:
                from bench import precision

                say("extra: bf16's deviation from fp32, torch.compile's gain")

                def pr():
                    results.doc["extras"].update(precision.run(images, heads, size["fast_images"] * 4, batch))
                    return {}

                attempt("precision", pr)
            if "dedup" in steps:
                from bench import dedup

                say("figures: dedup driver memory at 10x rows, semantic recall, rows/s per method")
                attempt("dedup", lambda: dedup.run(args.work, size["dedup_rows"], size["dedup_dim"],
                                                   size["dedup_rate_rows"], size["dedup_rate_dim"]))
            if "recurate" in steps:
                from bench import recurate

                say("figure 7: recurate (new threshold + new head from the stored embeddings) vs curate")
                attempt("recurate", lambda: recurate.run(images, heads, args.work, batch))
            if "watermark" in steps:
                from bench import watermark_effnet

                say("extra: LAION's watermark model (a second forward at 256x256) vs a CLIP-head pwatermark")

                def wm():
                    results.doc["extras"]["watermark_effnet"] = watermark_effnet.run(
                        images, heads, args.work, size["fast_images"], plan.torch_threads, batch)
                    return {}

                attempt("watermark", wm)
    if "scaleout" in steps:
        from bench import scaleout

        say("figure 6: scale-out, 2 nodes x 1 CPU vs 1 node x 1 CPU (each node pinned to a core)")
        attempt("scaleout", lambda: scaleout.run(images, size["scaleout_shards"], heads, args.work, 64))
    results.save()
    say(f"wrote {results.json_path} and {results.md_path}")
    with open(results.md_path) as f:
        print(f.read())
    return 0 if results.doc["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
