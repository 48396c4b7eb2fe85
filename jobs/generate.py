"""``shardsmith generate PROMPTS OUTPUT --model MODEL``: bulk text-to-image with Stable Diffusion on Ray.

PROMPTS is a parquet, jsonl or csv table (fsspec URL) with ``prompt`` and optional per-row ``key``,
``negative_prompt``, ``seed``, ``num_inference_steps``, ``guidance_scale``, ``width``, ``height``,
``num_images``, and for the other modes and adapters ``mode`` (txt2img, img2img, inpaint,
outpaint), ``image`` (a path/URL or a key of --images), ``mask`` (a path/URL, random-box, center,
border:PX), ``strength``, ``pad``, ``controlnet``, ``control_image``, ``control`` (canny),
``control_scale``, ``lora`` (path[:scale];...), ``textual_inversion`` (path[:token];...),
``refiner``, ``high_noise_frac`` (the options below give the defaults). Any other column is an
error unless --extra-columns names it (copied into KEY.json). Or ``--from-captions SHARDS`` to use
the captions of a (curated) webdataset as prompts, keys linking back. MODEL is a local diffusers
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
from shardsmith.jobs.entry import job_main


def _abs(value: str | None) -> str | None:
    """A flag's local path made absolute (URLs and hub ids unchanged), so that tasks hold where
    the file is whatever folder their prompt table is in."""
    import os

    if value is None or "://" in value or os.path.isabs(value) or not os.path.exists(value):
        return value
    return os.path.abspath(value)


def _abs_adapter(item: str) -> str:
    from shardsmith.pipelines.formats.prompts import split_suffix

    path, suffix = split_suffix(item)
    return _abs(path) if suffix is None else f"{_abs(path)}:{suffix}"


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
    p.add_argument("--safety-checker", default="auto", choices=("auto", "on", "off"),
                   help="the model's safety checker: on (flagged images are error rows of kind unsafe_content, "
                        "never written), off; auto (default): on where the model ships one")
    p.add_argument("--controlnet", help="default ControlNet (diffusers dir, hub id or fsspec URL)")
    p.add_argument("--control", help="detector applied to the source image for the ControlNet: canny[:LOW,HIGH]")
    p.add_argument("--control-scale", type=float, default=1.0, help="default controlnet_conditioning_scale (1.0)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="default LoRA (repeat for several; local or fsspec URL), loaded with diffusers' LoRA loader")
    p.add_argument("--textual-inversion", action="append", default=[], metavar="PATH[:TOKEN]",
                   help="default textual-inversion embedding (repeat for several)")

    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="redo everything in OUTPUT")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="?", help="prompt table: .parquet, .jsonl or .csv (fsspec URL)")
    p.add_argument("output", help="output folder (fsspec URL)")
    p.add_argument("--from-captions", metavar="SHARDS", help="use the captions of these webdataset shards as prompts")
    p.add_argument("--width", type=int, default=512, help="default width (multiple of 8)")
    p.add_argument("--height", type=int, default=512, help="default height (multiple of 8)")
    p.add_argument("--num-images", type=int, default=1, help="default images per prompt row")
    p.add_argument("--shard-size", type=int, default=100, help="images per output shard")
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompt rows / captions (0 = all)")
    p.add_argument("--mode", default="auto", choices=("auto", "txt2img", "img2img", "inpaint", "outpaint"),
                   help="default mode; auto: outpaint with a pad, inpaint with a mask, img2img with an image, "
                        "else txt2img")
    p.add_argument("--images", metavar="SHARDS",
                   help="webdataset whose keys the image column may name (default with --from-captions: those shards)")
    p.add_argument("--mask", help="default mask: a path/URL, random-box, center or border:PX")
    p.add_argument("--strength", type=float, help="default strength (default: img2img 0.8, inpaint/outpaint 1.0)")
    p.add_argument("--pad", help="default outpainting pad: left,top,right,bottom or WxH")
    p.add_argument("--control-image", help="default ControlNet control image (path/URL)")
    p.add_argument("--refiner", help="SDXL refiner model: the base denoises to --high-noise-frac, the refiner the rest")
    p.add_argument("--high-noise-frac", type=float, default=0.8,
                   help="fraction of the steps the SDXL base runs before the refiner (default 0.8)")
    p.add_argument("--extra-columns", default="", metavar="COL,COL",
                   help="prompt-table columns to copy into KEY.json (any other unknown column is an error)")
    p.add_argument("--batch-forward", action="store_true",
                   help="one pipeline call per --batch-size txt2img images of one shape: faster, and each image "
                        "equals a direct diffusers call with that same batch, not a call of its own (see README)")
    add_model_arguments(p)


def base_config(args: argparse.Namespace, row_defaults: dict | None = None, **extra):
    from shardsmith.pipelines.config.generate import GenerateConfig
    from shardsmith.pipelines.formats.prompts import Defaults

    d = Defaults(negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                 width=getattr(args, "width", 512), height=getattr(args, "height", 512),
                 num_images=getattr(args, "num_images", 1), seed=args.seed, controlnet=_abs(args.controlnet),
                 control=args.control, control_scale=args.control_scale,
                 lora=tuple(_abs_adapter(x) for x in args.lora),
                 textual_inversion=tuple(_abs_adapter(x) for x in args.textual_inversion), **(row_defaults or {}))
    return GenerateConfig(output=args.output, model=args.model, revision=args.revision, scheduler=args.scheduler,
                          dtype=args.dtype, device=args.device, batch_size=args.batch_size,
                          num_actors=args.num_actors, actor_cpus=args.actor_cpus, threads=args.threads,
                          watermark=not args.no_watermark, safety_checker=args.safety_checker,
                          defaults=d, address=args.address, overwrite=args.overwrite, progress=not args.quiet, **extra)


COMMITS_SHARDS = True


def run(args: argparse.Namespace) -> int:
    from shardsmith.pipelines.flows.generate import run_generate

    if bool(args.prompts) == bool(args.from_captions):
        raise ConfigError("give a PROMPTS table or --from-captions SHARDS (one of them)")
    extra = tuple(c.strip() for c in args.extra_columns.split(",") if c.strip())
    rows = dict(mode=args.mode, mask=_abs(args.mask), strength=args.strength, pad=args.pad,
                control_image=_abs(args.control_image), refiner=_abs(args.refiner), high_noise_frac=args.high_noise_frac)
    run_generate(base_config(args, rows, prompts=args.prompts, from_captions=args.from_captions,
                             shard_size=args.shard_size, limit=args.limit, images=args.images, extra_columns=extra,
                             batch_forward=args.batch_forward))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.generate", __doc__, add_arguments, run, argv, commits=COMMITS_SHARDS)


if __name__ == "__main__":
    raise SystemExit(main())
