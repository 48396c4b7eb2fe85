"""``shardsmith fit-head RUN LABELS OUTPUT_HEAD``: fit your own CLIP-based head (a watermark or
NSFW classifier, an aesthetic regressor) on labelled embeddings, with k-fold held-out metrics.

RUN is a curate OUTPUT written with ``--embeddings`` (clip-retrieval layout: img_emb/ + metadata/);
LABELS a parquet or csv table with columns ``key`` and ``label``, joined on key. Or
``--images DIR_OR_SHARDS [LABELS] OUTPUT_HEAD``: labelled webdataset shards (a label in KEY.cls,
KEY.label or KEY.json's --label-field; ``shardsmith make-watermark-data`` writes such shards) or
folders LABEL/IMAGE, embedded on the fly with --clip-model on Ray (into OUTPUT_HEAD.embeddings/,
resumable).

--task binary (labels 0/1) fits a ``probability`` head (logistic regression, or --hidden N for one
hidden layer): held-out AUC and accuracy at 0.5. --task regression fits an ``mlp`` head of LAION's
aesthetic shape (768 -> 1024 -> 128 -> 64 -> 16 -> 1, ReLU; --hidden to change it): held-out MSE and
Spearman. Metrics are averaged over --folds held-out folds; the head written is fitted on every row.

Writes OUTPUT_HEAD (safetensors), OUTPUT_HEAD.json (its card: CLIP model and pretrained tag,
embedding size, data, date, metrics) and OUTPUT_HEAD.report.html (ROC or predicted-vs-true, score
histograms per label). Use it with ``heads: {pwm: {arch: probability, weights: OUTPUT_HEAD}}`` (or
``--watermark-head OUTPUT_HEAD``); curate refuses it with another CLIP model than the card's.

    python -m shardsmith.jobs.fit_head RUN LABELS OUTPUT_HEAD [--task binary] [--folds 5]
"""

from __future__ import annotations

import argparse

from shardsmith.jobs.entry import job_main


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="RUN LABELS OUTPUT_HEAD",
                   help="RUN LABELS OUTPUT_HEAD; with --images: [LABELS] OUTPUT_HEAD")
    p.add_argument("--images", metavar="DIR_OR_SHARDS",
                   help="labelled webdataset shards or folders LABEL/IMAGE, embedded with --clip-model")
    p.add_argument("--task", choices=["binary", "regression"], default="binary",
                   help="binary: 0/1 labels -> probability head (default); regression -> mlp head")
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold held-out metrics (default 5)")
    p.add_argument("--hidden", metavar="N,N,...", help="hidden layer sizes (binary default: none, logistic "
                                                       "regression; regression default 1024,128,64,16)")
    p.add_argument("--epochs", type=int, default=0, help="training epochs, full batch (default 300 / 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-field", default="label", help="--images shards: the KEY.json field holding the label")
    p.add_argument("--clip-model", help="--images: open_clip model name or JSON config (default ViT-L-14-quickgelu)")
    p.add_argument("--clip-pretrained", help="--images: pretrained tag or checkpoint (default openai)")
    p.add_argument("--work", help="--images: where the embeddings go (default OUTPUT_HEAD.embeddings)")
    p.add_argument("--batch-size", type=int, default=64, help="--images: images per model forward")
    p.add_argument("--device", default="auto", help="--images: auto, cpu, cuda or cuda:N")
    p.add_argument("--address", help="--images: Ray cluster address (default: a local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def config_from_args(args: argparse.Namespace):
    from shardsmith.errors import ConfigError
    from shardsmith.pipelines.config.fit_head import FitHeadConfig

    paths = list(args.paths)
    cfg = FitHeadConfig(images=args.images, task=args.task, folds=args.folds, epochs=args.epochs, seed=args.seed,
                        label_field=args.label_field, work=args.work, batch_size=args.batch_size, device=args.device,
                        address=args.address, progress=not args.quiet)
    if args.images:
        if len(paths) > 2:
            raise ConfigError("with --images give [LABELS] OUTPUT_HEAD (the images come from --images)")
        cfg.labels, cfg.output = (paths if len(paths) == 2 else [None, paths[0]])
    else:
        if len(paths) != 3:
            raise ConfigError("expected RUN LABELS OUTPUT_HEAD (or --images DIR_OR_SHARDS [LABELS] OUTPUT_HEAD)")
        cfg.run, cfg.labels, cfg.output = paths
    if args.hidden:
        try:
            cfg.hidden = [int(v) for v in args.hidden.split(",") if v.strip()]
        except ValueError as e:
            raise ConfigError(f"--hidden {args.hidden!r}: expected sizes such as 1024,128,64,16") from e
    if args.clip_model:
        cfg.clip_model = args.clip_model
    if args.clip_pretrained:
        cfg.clip_pretrained = args.clip_pretrained
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    from shardsmith.pipelines.flows.fit_head import run_fit_head

    run_fit_head(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.fit_head", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
