"""``shardsmith convert-predictor SRC OUTPUT``: LAION's Keras NSFW detector as a safetensors head.

SRC is LAION-AI/CLIP-based-NSFW-Detector's ``clip_autokeras_binary_nsfw.zip`` (ViT-L/14) or
``clip_autokeras_nsfw_b32.zip`` (ViT-B/32), as published or unpacked. Its weights are read from the
SavedModel's TensorFlow checkpoint without TensorFlow; OUTPUT is a ``laion-nsfw`` state dict
(safetensors) for ``--nsfw-head OUTPUT`` or ``heads: {punsafe: {arch: laion-nsfw, weights: OUTPUT}}``.
The few input columns AutoKeras encoded as categorical are fed numerically (what the PyTorch ports
do); the README's Predictors section says how far that moves the scores. The built-in predictors
``laion-nsfw-l14`` and ``laion-nsfw-b32`` run this conversion on fetch.

    python -m shardsmith.jobs.convert_predictor SRC OUTPUT
"""

from __future__ import annotations

import argparse

from shardsmith.jobs.entry import job_main


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="the Keras SavedModel zip (or its unpacked folder), a local path")
    p.add_argument("output", help="the laion-nsfw safetensors file to write")
    p.add_argument("--format", default="laion-nsfw-keras", choices=["laion-nsfw-keras"],
                   help="what SRC is (default laion-nsfw-keras, the only conversion there is)")


def run(args: argparse.Namespace) -> int:
    import os

    from shardsmith.errors import InputError
    from shardsmith.filters.keras_nsfw import convert_keras_nsfw

    if not os.path.exists(args.src):
        raise InputError(f"{args.src}: file not found")
    info = convert_keras_nsfw(args.src, args.output)
    print(f"wrote {args.output}: laion-nsfw head, input {info['input_size']}-d, layers {info['layers']}; "
          f"columns AutoKeras took for categorical, fed numerically: {info['categorical_columns'] or 'none'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.convert_predictor", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
