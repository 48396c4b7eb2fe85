"""``shardsmith demo``: the whole curate flow on an embedded default, offline.

1. writes a deterministic sample dataset (``sample-data``),
2. builds tiny random models (``tiny-models``),
3. curates the image shards on a local Ray with the LAION-Aesthetics 5+ preset (keeping embeddings),
   then re-curates that run with a lower aesthetic threshold from its stored scores (``recurate``),
   then fits a watermark head of its own: synthetic watermarks on the clean images of the training
   shards 00000-00001 (``make-watermark-data``), ``fit-head --images`` with the tiny CLIP, and scores
   the held-out shard 00002, printing the held-out AUC against the sample's own watermarks,
4. reproduces a LAION-Aesthetics 5+ selection from the sample's LAION metadata (metadata-only mode),
5. generates a handful of images from the curated captions with a tiny Stable Diffusion pipeline,
6. augments those with img2img variants, and curates the generated images back (``generated`` column),

everything under ``./demo-output/``. The demo models are untrained: the scores exercise the
pipeline and mean nothing about the images. A rerun reuses the data and models and resumes.

    python -m shardsmith.jobs.demo [--output demo-output]
"""

from __future__ import annotations

import argparse
import json
import os

from shardsmith.jobs.entry import job_main

REAL_WEIGHTS_HINT = """\
The demo models are UNTRAINED (random tiny CLIP, random or toy-fit heads): the numbers above show
the pipeline working, not the quality of the images. With LAION's real predictors, fetched by name
on first use (sha256-verified, cached; see `shardsmith predictors list`):

  shardsmith curate 's3://bucket/laion/{00000..00999}.tar' s3://bucket/curated \\
      --clip-model ViT-L-14-quickgelu --clip-pretrained openai \\
      --aesthetic-head laion-aesthetic-v2 --nsfw-head laion-nsfw-l14 \\
      --watermark-head laion-watermark-effnet --preset laion-aesthetics-5plus
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="demo-output", help="folder for everything the demo writes (default demo-output)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--fresh", action="store_true", help="redo the curate runs instead of resuming")


def run(args: argparse.Namespace) -> int:
    from shardsmith.jobs.sample_data import make_sample_data
    from shardsmith.jobs.tiny_models import make_tiny_models
    from shardsmith.pipelines.config import CurateConfig
    from shardsmith.pipelines.config.generate import GenerateConfig
    from shardsmith.pipelines.core.resources import ray_session
    from shardsmith.pipelines.flows.augment import run_augment
    from shardsmith.pipelines.flows.curate import run_curate
    from shardsmith.pipelines.config.recurate import RecurateConfig
    from shardsmith.pipelines.flows.generate import run_generate
    from shardsmith.pipelines.flows.recurate import run_recurate
    from shardsmith.pipelines.formats.prompts import Defaults

    out = args.output
    data_dir, models_dir = os.path.join(out, "sample"), os.path.join(out, "models")
    if not os.path.exists(os.path.join(data_dir, "images", "00002.tar")):
        print(f"[demo] writing the sample dataset to {data_dir}")
        make_sample_data(data_dir)
    models_json = os.path.join(models_dir, "tiny-models.json")
    models = {}
    if os.path.exists(models_json):
        with open(models_json) as f:
            models = json.load(f)
    if "sd_model" not in models:
        print(f"[demo] building tiny models in {models_dir}")
        models = make_tiny_models(models_dir)
    with ray_session(args.address):
        print("\n[demo] curate: image shards, LAION-Aesthetics 5+ preset, tiny models")
        run_curate(CurateConfig(
            input=os.path.join(data_dir, "images"), output=os.path.join(out, "curated"),
            clip_model=models["clip_model"], clip_pretrained=models["clip_pretrained"],
            aesthetic_head=models["aesthetic_head"], watermark_head=models["watermark_head"],
            nsfw_head=models["nsfw_head"], preset="laion-aesthetics-5plus", overwrite=args.fresh,
            embeddings=True, address=args.address))
        print("\n[demo] recurate: the same selection with aesthetic >= 4.5 instead of 5, from the stored scores "
              "(no image decoded, no model loaded)")
        run_recurate(RecurateConfig(
            run=os.path.join(out, "curated"), output=os.path.join(out, "recurated"), preset="none",
            rules=["aesthetic >= 4.5", "pwatermark < 0.8", "punsafe < 0.5"], overwrite=args.fresh,
            address=args.address))
        fit_watermark_head(data_dir, out, models, args)
        print("\n[demo] curate: metadata-only mode on LAION-style metadata parquet")
        run_curate(CurateConfig(
            input=os.path.join(data_dir, "metadata"), output=os.path.join(out, "metadata-curated"),
            preset="laion-aesthetics-5plus", overwrite=args.fresh, address=args.address))
        steps = Defaults(num_inference_steps=4, width=256, height=256, seed=0)
        print("\n[demo] generate: 8 images from the curated captions (tiny Stable Diffusion, 256x256, 4 steps)")
        run_generate(GenerateConfig(
            output=os.path.join(out, "generated"), model=models["sd_model"],
            from_captions=os.path.join(out, "curated", "curated"), limit=8, defaults=steps, shard_size=4,
            overwrite=args.fresh, address=args.address))
        print("\n[demo] augment: 2 img2img variants of each generated image, strength 0.6, 10% caption dropout")
        run_augment(GenerateConfig(
            output=os.path.join(out, "augmented"), model=models["sd_model"], input=os.path.join(out, "generated"),
            variants=2, strength=0.6, caption_dropout=0.1, size=(256, 256), defaults=steps,
            overwrite=args.fresh, address=args.address))
        print("\n[demo] curate the generated images back, looking for the invisible watermark")
        run_curate(CurateConfig(
            input=os.path.join(out, "generated"), output=os.path.join(out, "generated-curated"),
            clip_model=models["clip_model"], clip_pretrained=models["clip_pretrained"],
            aesthetic_head=models["aesthetic_head"], watermark_head=models["watermark_head"],
            nsfw_head=models["nsfw_head"], preset="none", detect_generated=True, overwrite=args.fresh,
            address=args.address))
    print()
    print(REAL_WEIGHTS_HINT)
    print(f"[demo] done: see {os.path.join(out, 'curated')} (scores/, curated/, stats.json), "
          f"{os.path.join(out, 'recurated')}, {os.path.join(out, 'metadata-curated')}, "
          f"{os.path.join(out, 'generated')}, "
          f"{os.path.join(out, 'augmented')} and {os.path.join(out, 'generated-curated')}")
    return 0


def fit_watermark_head(data_dir: str, out: str, models: dict, args: argparse.Namespace) -> float:
    """make-watermark-data on the training shards, fit-head --images, score the held-out shard;
    returns (and prints) the held-out AUC, whatever it is."""
    from shardsmith.filters.fit import auc
    from shardsmith.jobs.make_watermark_data import make_watermark_data
    from shardsmith.pipelines.config import CurateConfig
    from shardsmith.pipelines.config.fit_head import FitHeadConfig
    from shardsmith.pipelines.flows.curate import run_curate
    from shardsmith.pipelines.flows.fit_head import labels_from_shards, run_fit_head

    images = os.path.join(data_dir, "images")
    wm_dir, head = os.path.join(out, "watermark-data"), os.path.join(out, "models", "pwatermark-fit.safetensors")
    print("\n[demo] fit a watermark head: synthetic watermarks on the training shards' clean images, fit-head --images")
    if args.fresh or not os.path.exists(os.path.join(wm_dir, "summary.json")):
        make_watermark_data(os.path.join(images, "{00000,00001}.tar"), wm_dir, per_shard=100, max_side=512,
                            skip_if="sample_watermarked")
    card = run_fit_head(FitHeadConfig(output=head, images=wm_dir, clip_model=models["clip_model"],
                                      clip_pretrained=models["clip_pretrained"], folds=5, address=args.address,
                                      progress=False))
    heldout = os.path.join(images, "00002.tar")
    scored = os.path.join(out, "watermark-heldout")
    run_curate(CurateConfig(input=heldout, output=scored, clip_model=models["clip_model"],
                            clip_pretrained=models["clip_pretrained"], watermark_head=head, preset="none",
                            similarity=False, overwrite=True, report=False, progress=False, address=args.address),
               log=lambda *a: None)
    import pyarrow.parquet as pq

    truth = labels_from_shards([heldout], "sample_watermarked")
    rows = [r for r in pq.read_table(os.path.join(scored, "scores", "00002.parquet")).to_pylist()
            if r["pwatermark"] is not None and r["key"] in truth]
    value = auc([truth[r["key"]] for r in rows], [r["pwatermark"] for r in rows])
    print(f"[demo] fitted watermark head: held-out AUC {card['metrics']['auc']:.3f} on the synthetic data "
          f"({card['folds']}-fold), AUC {value:.3f} on held-out shard 00002's own watermarks ({len(rows)} images). "
          "The tiny CLIP is random, so near 0.5 is what to expect here; the same steps with ViT-L-14-quickgelu "
          "make a real CLIP-based watermark head (README: Heads of your own).")
    return value


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.demo", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
