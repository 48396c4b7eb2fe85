"""``shardsmith augment INPUT OUTPUT --model MODEL --strength S --variants N``: img2img (SDEdit) variants.

Each source image of the webdataset INPUT yields N variants, each with its own seed derived from
--seed and the variant's key (``SOURCEKEY_vJ``); the prompt is the caption (or --prompt-template,
with {caption} and {key}); each variant's json links to its source key and shard. Training-set
preparation: --caption-dropout P empties a deterministic fraction P of the stored captions (SD's
final training rounds dropped 10%), --buckets resizes/crops sources to SDXL-style aspect-ratio
buckets of --bucket-area pixels (else the long side is scaled to --max-side, or --size WxH).
An unreadable source image gives error rows; the rest of the shard completes. Structure-preserving
variants: ``--controlnet MODEL --control canny`` conditions each variant on the source's edge map;
``--lora`` / ``--textual-inversion`` apply adapters to every variant.

    python -m shardsmith.jobs.augment INPUT OUTPUT --model MODEL [options]
"""

from __future__ import annotations

import argparse

from shardsmith.jobs.entry import job_main
from shardsmith.jobs.generate import MODEL_FLAGS, add_model_arguments
from shardsmith.jobs.generate import config_from_args as generate_config


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WxH, e.g. 512x512") from e
    if w % 8 or h % 8 or w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive multiples of 8")
    return w, h


FLAGS = {**MODEL_FLAGS, "input": "input", "strength": "strength", "variants": "variants",
         "prompt_template": "prompt_template", "caption_dropout": "caption_dropout", "size": "size",
         "max_side": "max_side", "buckets": "buckets", "bucket_area": "bucket_area", "limit": "limit"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="webdataset shards to augment (fsspec URL, glob, {a,b})")
    p.add_argument("output", help="output folder (fsspec URL)")
    p.add_argument("--strength", type=float, help="img2img strength in (0, 1] (default 0.5)")
    p.add_argument("--variants", type=int, help="variants per source image (default 1)")
    p.add_argument("--prompt-template", help="prompt; {caption} and {key} are filled in (default {caption})")
    p.add_argument("--caption-dropout", type=float, help="fraction of stored captions emptied, e.g. 0.1 (default 0)")
    p.add_argument("--size", type=_size, help="fixed output size WxH (multiples of 8)")
    p.add_argument("--max-side", type=int, help="without --size/--buckets: long side (default 512)")
    p.add_argument("--buckets", action="store_true", default=None, help="snap to SDXL-style aspect-ratio buckets")
    p.add_argument("--bucket-area", type=int, help="bucket area in pixels (default 1024*1024)")
    p.add_argument("--limit", type=int, help="augment only the first N samples of each shard (0 = all, the default)")
    add_model_arguments(p)


def config_from_args(args: argparse.Namespace, validate: bool = True):
    return generate_config(args, validate, FLAGS, "augment")


COMMITS_SHARDS = True


def run(args: argparse.Namespace) -> int:
    from shardsmith.pipelines.flows.augment import run_augment

    run_augment(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.augment", __doc__, add_arguments, run, argv, commits=COMMITS_SHARDS)


if __name__ == "__main__":
    raise SystemExit(main())
