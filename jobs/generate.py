"""``shardsmith generate PROMPTS OUTPUT --model MODEL``: bulk text-to-image with Stable Diffusion on Ray.

PROMPTS is a parquet, jsonl or csv table (fsspec URL) with ``prompt`` and optional per-row ``key``,
``negative_prompt``, ``seed``, ``num_inference_steps``, ``guidance_scale``, ``width``, ``height``,
``num_images`` (the options below give the defaults); or ``--from-captions SHARDS`` to use the
captions of a (curated) webdataset as prompts, keys linking back. MODEL is a local diffusers
directory, a hub id (with internet) or an fsspec URL of one.

A row with seed s gives exactly the image of a direct diffusers call with
``generator=torch.Generator("cpu").manual_seed(s)`` and the same parameters (N images: seeds s..s+N-1);
rows without a seed get one derived from --seed and the row's key. OUTPUT gets NNNNN.tar (KEY.png,
KEY.txt = prompt, KEY.json = every parameter) + NNNNN.parquet per shard, stats.json, manifest.json;
`shardsmith curate OUTPUT ...` reads it back. Images carry an invisible watermark (payload SSMTH1,
see filters/watermark.py) unless --no-watermark. A rerun resumes.

    python -m shardsmith.jobs.generate PROMPTS OUTPUT --model MODEL [options]
"""

from __future__ import annotations

import argparse

from shardsmith.errors import ConfigError
from shardsmith.jobs.entry import add_run_arguments, apply_run_arguments, job_main


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers pipeline: local dir, hub id or fsspec URL")
    p.add_argument("--revision", help="model revision (hub models)")
    p.add_argument("--scheduler", help="ddim, pndm, euler, euler_a, dpm++, unipc, lms, heun (default: the model's own)")
    p.add_argument("--dtype", default="auto", help="auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--batch-size", type=int, default=4, help="images per actor call, grouped per identical parameters")
    p.add_argument("--num-actors", type=int, default=0, help="pipeline actors (default: one per GPU, or sized from CPUs)")
    p.add_argument("--actor-cpus", type=float, default=0.0, help="CPUs per actor (default automatic)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per actor on CPU (default: torch's default here; recorded in KEY.json, "
                        "since CPU results depend on it)")
    p.add_argument("--steps", type=int, default=30, help="default num_inference_steps")
    p.add_argument("--guidance", type=float, default=7.5, help="default guidance_scale")
    p.add_argument("--negative-prompt", default="", help="default negative prompt")
    p.add_argument("--seed", type=int, default=0, help="run seed: rows without a seed derive theirs from it and their key")
    p.add_argument("--no-watermark", action="store_true", help="do not embed the invisible watermark")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="redo everything in OUTPUT")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_run_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="?", help="prompt table: .parquet, .jsonl or .csv (fsspec URL)")
    p.add_argument("output", help="output folder (fsspec URL)")
    p.add_argument("--from-captions", metavar="SHARDS", help="use the captions of these webdataset shards as prompts")
    p.add_argument("--width", type=int, default=512, help="default width (multiple of 8)")
    p.add_argument("--height", type=int, default=512, help="default height (multiple of 8)")
    p.add_argument("--num-images", type=int, default=1, help="default images per prompt row")
    p.add_argument("--shard-size", type=int, default=100, help="images per output shard")
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompt rows / captions (0 = all)")
    add_model_arguments(p)


def base_config(args: argparse.Namespace, **extra):
    from shardsmith.pipelines.config.generate import GenerateConfig
    from shardsmith.pipelines.formats.prompts import Defaults

    d = Defaults(negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                 width=getattr(args, "width", 512), height=getattr(args, "height", 512),
                 num_images=getattr(args, "num_images", 1), seed=args.seed)
    cfg = GenerateConfig(output=args.output, model=args.model, revision=args.revision, scheduler=args.scheduler,
                         dtype=args.dtype, device=args.device, batch_size=args.batch_size,
                         num_actors=args.num_actors, actor_cpus=args.actor_cpus, threads=args.threads,
                         watermark=not args.no_watermark,
                         defaults=d, address=args.address, overwrite=args.overwrite, progress=not args.quiet, **extra)
    apply_run_arguments(args, cfg)
    return cfg


COMMITS_SHARDS = True


def run(args: argparse.Namespace) -> int:
    from shardsmith.pipelines.flows.generate import run_generate

    if bool(args.prompts) == bool(args.from_captions):
        raise ConfigError("give a PROMPTS table or --from-captions SHARDS (one of them)")
    run_generate(base_config(args, prompts=args.prompts, from_captions=args.from_captions,
                             shard_size=args.shard_size, limit=args.limit))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.generate", __doc__, add_arguments, run, argv, commits=COMMITS_SHARDS)


if __name__ == "__main__":
    raise SystemExit(main())
