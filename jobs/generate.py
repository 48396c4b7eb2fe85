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

from shardsmith.jobs.entry import add_run_arguments, apply_run_arguments, job_main


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


def _adapters(items: list[str]) -> tuple[str, ...]:
    return tuple(_abs_adapter(x) for x in items)


def _columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


# CLI flag -> config key (``defaults.*``: the per-row defaults of the prompt table); a flag not
# given leaves the --config file's value, or the default, in place.
MODEL_FLAGS = {
    "model": "model", "revision": "revision", "scheduler": "scheduler", "dtype": "dtype", "compile": "compile",
    "device": "device", "batch_size": "batch_size", "num_actors": "num_actors", "actor_cpus": "actor_cpus",
    "threads": "threads",
    "steps": "defaults.num_inference_steps", "guidance": "defaults.guidance_scale",
    "negative_prompt": "defaults.negative_prompt", "seed": "defaults.seed",
    "no_watermark": ("watermark", lambda v: not v), "address": "address", "overwrite": "overwrite",
    "quiet": ("progress", lambda v: not v), "output": "output", "safety_checker": "safety_checker",
    "controlnet": ("defaults.controlnet", _abs), "control": "defaults.control",
    "control_scale": "defaults.control_scale", "lora": ("defaults.lora", _adapters),
    "textual_inversion": ("defaults.textual_inversion", _adapters),
}
FLAGS = {**MODEL_FLAGS, "prompts": "prompts", "from_captions": "from_captions", "width": "defaults.width",
         "height": "defaults.height", "num_images": "defaults.num_images", "shard_size": "shard_size",
         "limit": "limit", "mode": "defaults.mode", "images": "images", "mask": ("defaults.mask", _abs),
         "strength": "defaults.strength", "pad": "defaults.pad", "control_image": ("defaults.control_image", _abs),
         "refiner": ("defaults.refiner", _abs), "high_noise_frac": "defaults.high_noise_frac",
         "extra_columns": ("extra_columns", _columns), "batch_forward": "batch_forward"}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (GenerateConfig keys: `shardsmith config show "
                                                    f"{p.prog.rsplit(' ', 1)[-1]}`); flags given here win")
    p.add_argument("--model", help="diffusers pipeline: local dir, hub id or fsspec URL (required, here or in --config)")
    p.add_argument("--revision", help="model revision (hub models)")
    p.add_argument("--scheduler", help="ddim, pndm, euler, euler_a, dpm++, unipc, lms, heun (default: the model's own)")
    p.add_argument("--dtype", help="auto (default: float16 on GPU, bfloat16 on CPUs with bf16 units, else float32), float32, float16, bfloat16")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the UNet (dynamic=False): compiles once per actor and input shape; images "
                        "differ from eager's in the last bits (KEY.json: unet_compiled). Off by default: measured "
                        "in `make bench` (README, Performance)")
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.add_argument("--batch-size", type=int, help="images per actor call, grouped per identical parameters (default 4)")
    p.add_argument("--num-actors", type=int, help="pipeline actors (default: one per GPU, or sized from CPUs)")
    p.add_argument("--actor-cpus", type=float, help="CPUs per actor (default automatic)")
    p.add_argument("--threads", type=int,
                   help="torch threads per actor on CPU (default: torch's default here; recorded in KEY.json, "
                        "since CPU results depend on it)")
    p.add_argument("--steps", type=int, help="default num_inference_steps (default 30)")
    p.add_argument("--guidance", type=float, help="default guidance_scale (default 7.5)")
    p.add_argument("--negative-prompt", help="default negative prompt (default none)")
    p.add_argument("--seed", type=int, help="run seed: rows without a seed derive theirs from it and their key (default 0)")
    p.add_argument("--no-watermark", action="store_true", default=None, help="do not embed the invisible watermark")
    p.add_argument("--safety-checker", choices=("auto", "on", "off"),
                   help="the model's safety checker: on (flagged images are error rows of kind unsafe_content, "
                        "never written), off; auto (default): on where the model ships one")
    p.add_argument("--controlnet", help="default ControlNet (diffusers dir, hub id or fsspec URL)")
    p.add_argument("--control", help="detector applied to the source image for the ControlNet: canny[:LOW,HIGH]")
    p.add_argument("--control-scale", type=float, help="default controlnet_conditioning_scale (default 1.0)")
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                   help="default LoRA (repeat for several; local or fsspec URL), loaded with diffusers' LoRA loader")
    p.add_argument("--textual-inversion", action="append", default=None, metavar="PATH[:TOKEN]",
                   help="default textual-inversion embedding (repeat for several)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--overwrite", action="store_true", default=None, help="redo everything in OUTPUT")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress lines")
    add_run_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="?", help="prompt table: .parquet, .jsonl or .csv (fsspec URL)")
    p.add_argument("output", help="output folder (fsspec URL)")
    p.add_argument("--from-captions", metavar="SHARDS", help="use the captions of these webdataset shards as prompts")
    p.add_argument("--width", type=int, help="default width (multiple of 8; default 512)")
    p.add_argument("--height", type=int, help="default height (multiple of 8; default 512)")
    p.add_argument("--num-images", type=int, help="default images per prompt row (default 1)")
    p.add_argument("--shard-size", type=int, help="images per output shard (default 100)")
    p.add_argument("--limit", type=int, help="use only the first N prompt rows / captions (0 = all, the default)")
    p.add_argument("--mode", choices=("auto", "txt2img", "img2img", "inpaint", "outpaint"),
                   help="default mode; auto (default): outpaint with a pad, inpaint with a mask, img2img with an "
                        "image, else txt2img")
    p.add_argument("--images", metavar="SHARDS",
                   help="webdataset whose keys the image column may name (default with --from-captions: those shards)")
    p.add_argument("--mask", help="default mask: a path/URL, random-box, center or border:PX")
    p.add_argument("--strength", type=float, help="default strength (default: img2img 0.8, inpaint/outpaint 1.0)")
    p.add_argument("--pad", help="default outpainting pad: left,top,right,bottom or WxH")
    p.add_argument("--control-image", help="default ControlNet control image (path/URL)")
    p.add_argument("--refiner", help="SDXL refiner model: the base denoises to --high-noise-frac, the refiner the rest")
    p.add_argument("--high-noise-frac", type=float,
                   help="fraction of the steps the SDXL base runs before the refiner (default 0.8)")
    p.add_argument("--extra-columns", metavar="COL,COL",
                   help="prompt-table columns to copy into KEY.json (any other unknown column is an error)")
    p.add_argument("--batch-forward", action="store_true", default=None,
                   help="one pipeline call per --batch-size txt2img images of one shape: faster, and each image "
                        "equals a direct diffusers call with that same batch, not a call of its own (see README)")
    add_model_arguments(p)


def config_from_args(args: argparse.Namespace, validate: bool = True, flags: dict = FLAGS, tool: str = "generate"):
    """The GenerateConfig of these arguments: the defaults, the --config file's keys, the flags given."""
    from shardsmith.pipelines.config.base import config_from_args as from_args
    from shardsmith.pipelines.config.generate import GenerateConfig

    cfg = from_args(GenerateConfig, args, flags)
    apply_run_arguments(args, cfg)
    if validate:
        cfg.validate(tool)
    return cfg


COMMITS_SHARDS = True


def run(args: argparse.Namespace) -> int:
    from shardsmith.pipelines.flows.generate import run_generate

    run_generate(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.generate", __doc__, add_arguments, run, argv, commits=COMMITS_SHARDS)


if __name__ == "__main__":
    raise SystemExit(main())
