"""fit-head: a CLIP-based head from labelled embeddings, the way LAION built its predictors.

    labelled embeddings: RUN's clip-retrieval embeddings (curate --embeddings) joined on key with
                         LABELS (parquet/csv: key, label); or --images: labelled webdataset shards
                         (KEY.cls / KEY.label / a field of KEY.json) or folders LABEL/..., embedded
                         on the fly by a curate run on Ray (OUTPUT_HEAD.embeddings, resumable)
    -> k-fold held-out metrics, then the head fitted on every row (filters/fit.py)
    -> OUTPUT_HEAD (safetensors), OUTPUT_HEAD.json (the card: CLIP model, embedding size, data,
       date, metrics), OUTPUT_HEAD.report.html (+ .report/*.png)

curate loads the head with ``heads: {NAME: {arch: probability|mlp, weights: OUTPUT_HEAD}}`` and
refuses it when the run's CLIP model is not the card's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from shardsmith.errors import InputError, version
from shardsmith.filters.heads import card_url
from shardsmith.filters.predictors import clip_name
from shardsmith.pipelines.config.fit_head import FitHeadConfig
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.formats.labels import folders_to_shards, labels_from_shards, read_labels

@dataclass
class Labelled:
    keys: list[str]
    x: np.ndarray  # float32 (N, D), L2-normalised
    y: np.ndarray  # float32 (N,)
    groups: list | None  # rows of one group stay in one fold (None: every row its own)
    clip_model: str
    clip_pretrained: str | None
    data: dict  # what the card records about the data


def from_run(run: str, labels: dict[str, float], source: dict, groups: dict[str, str] | None = None) -> Labelled:
    """The labelled rows of RUN's embeddings (joined on key), and RUN's CLIP model."""
    from shardsmith.pipelines.formats.embeddings import embedding_shards, iter_embeddings

    manifest_url = fsutil.join(run, "manifest.json")
    if not fsutil.exists(manifest_url):
        raise InputError(f"RUN {run}: no manifest.json: not a curate output")
    models = (json.loads(fsutil.read_text(manifest_url)).get("models") or {})
    if not embedding_shards(run):
        raise InputError(f"RUN {run}: no embeddings (img_emb/): run curate with --embeddings")
    keys, parts, seen = [], [], 0
    for _, meta, emb in iter_embeddings(run):
        seen += len(emb)
        shard_keys = meta.column("key").to_pylist()
        rows = np.array([i for i, k in enumerate(shard_keys) if k in labels], dtype=np.int64)
        if len(rows):
            parts.append(emb[rows].astype(np.float32))
            keys.extend(shard_keys[i] for i in rows)
    if len(set(keys)) != len(keys):
        raise InputError(f"RUN {run}: a labelled key has more than one embedding (keys repeat across shards)")
    x = np.concatenate(parts) if parts else np.zeros((0, models.get("embed_dim") or 0), np.float32)
    y = np.array([labels[k] for k in keys], dtype=np.float32)
    missing = len(set(labels) - set(keys))
    data = {**source, "rows": len(keys), "embeddings_in_run": seen, "labelled_without_embedding": missing}
    g = [groups.get(k, k) for k in keys] if groups else None
    if g is not None:
        data["groups"] = len(set(g))
    return Labelled(keys, x, y, g, models.get("clip_model") or "", models.get("clip_pretrained"), data)


def embed_images(cfg: FitHeadConfig, log) -> tuple[str, list[str]]:
    """Embed --images with the chosen CLIP (a curate run with --embeddings, on Ray, resumable);
    returns (the run, the shards' URLs)."""
    from shardsmith.pipelines.config import CurateConfig
    from shardsmith.pipelines.flows.curate import run_curate
    from shardsmith.pipelines.formats.inputs import find_inputs

    work = cfg.work or cfg.output + ".embeddings"
    src = cfg.images
    if fsutil.isdir(src) and not [u for u in fsutil.list_files(src, (".tar",))]:
        urls = folders_to_shards(src, fsutil.join(work, "shards"))
        src = fsutil.join(work, "shards")
    else:
        urls = [u for u in find_inputs(src) if u.endswith(".tar")]
        if not urls:
            raise InputError(f"--images {src}: no webdataset shards (.tar) and no label folders")
    run = fsutil.join(work, "curate")
    log(f"fit-head: embedding {len(urls)} shard(s) of {cfg.images} with {cfg.clip_model} ({cfg.clip_pretrained}) "
        f"into {run}")
    run_curate(CurateConfig(input=src, output=run, mode="images", clip_model=cfg.clip_model,
                            clip_pretrained=cfg.clip_pretrained, preset=None, similarity=False, embeddings=True,
                            report=False, progress=cfg.progress, batch_size=cfg.batch_size, device=cfg.device,
                            num_actors=cfg.num_actors, address=cfg.address), log=log)
    return run, urls


def check_labels(y: np.ndarray, task: str, folds: int, where: str) -> dict:
    if len(y) == 0:
        raise InputError(f"{where}: no labelled row has an embedding (are the keys the curate keys?)")
    if task == "binary":
        bad = sorted({float(v) for v in y if v not in (0.0, 1.0)})
        if bad:
            raise InputError(f"{where}: --task binary needs labels 0 and 1, found {bad[:5]}")
        pos = int(y.sum())
        if min(pos, len(y) - pos) < folds:
            raise InputError(f"{where}: {pos} positive and {len(y) - pos} negative rows: each class needs at least "
                             f"--folds ({folds}) rows")
        return {"positives": pos, "negatives": int(len(y) - pos)}
    if not np.isfinite(y).all():
        raise InputError(f"{where}: a label is not a finite number")
    if len(y) < 2 * folds:
        raise InputError(f"{where}: {len(y)} rows: --task regression needs at least 2 x --folds rows")
    return {"label_mean": round(float(y.mean()), 6), "label_std": round(float(y.std()), 6),
            "label_min": float(y.min()), "label_max": float(y.max())}


def run_fit_head(cfg: FitHeadConfig, log=print) -> dict:
    """Fit, write the head, its card and its report; returns the card."""
    from safetensors.torch import save

    from shardsmith.filters.fit import FitOptions, fit_head

    cfg.validate()
    groups: dict | None
    if cfg.images:
        run, urls = embed_images(cfg, log)
        if cfg.labels:
            labels, groups = read_labels(cfg.labels)
        else:
            groups = {}
            labels = labels_from_shards(urls, cfg.label_field, groups)
        source = {"images": cfg.images, "labels": cfg.labels or f"shards' {cfg.label_field} field", "embeddings": run}
    else:
        run, (labels, groups) = cfg.run, read_labels(cfg.labels)
        source = {"run": cfg.run, "labels": cfg.labels}
    data = from_run(run, labels, source, groups or None)
    where = cfg.labels or cfg.images or run
    data.data.update(check_labels(data.y, cfg.task, cfg.folds, where))
    log(f"fit-head: {len(data.y)} labelled rows ({data.data['labelled_without_embedding']} labels without an "
        f"embedding), {data.x.shape[1]}-d {data.clip_model} embeddings, {cfg.task}, {cfg.folds}-fold")
    t0 = time.perf_counter()
    rep = fit_head(data.x, data.y, cfg.folds, FitOptions(cfg.task, tuple(cfg.hidden), cfg.epochs, seed=cfg.seed),
                   groups=data.groups)
    sd = {k: v.detach().contiguous() for k, v in rep.head.state_dict().items()}
    layers = [int(sd[k].shape[0]) for k in sorted((k for k in sd if k.endswith(".weight")),
                                                 key=lambda k: int(k.split(".")[1]))]
    card = {
        "kind": "shardsmith-head", "arch": cfg.arch, "task": cfg.task, "layers": layers,
        "clip": clip_name(data.clip_model, data.clip_pretrained), "clip_model": data.clip_model,
        "clip_pretrained": data.clip_pretrained, "embed_dim": int(data.x.shape[1]),
        "data": data.data, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics": {k: round(v, 6) for k, v in rep.metrics.items()}, "metrics_are": f"held-out, mean of {cfg.folds} folds",
        "per_fold": rep.per_fold, "train_metrics": {k: round(v, 6) for k, v in rep.train_metrics.items()},
        "folds": cfg.folds, "options": {"hidden": list(rep.options.hidden), "epochs": rep.options.epochs,
                                        "lr": rep.options.lr, "weight_decay": rep.options.weight_decay,
                                        "seed": cfg.seed},
        "fit_seconds": round(time.perf_counter() - t0, 2), "shardsmith": version(),
        "use": f"heads: {{NAME: {{arch: {cfg.arch}, weights: {cfg.output}}}}}",
    }
    fsutil.write_bytes_atomic(cfg.output, save(sd, metadata={"arch": cfg.arch, "clip": card["clip"]}))
    fsutil.write_bytes_atomic(card_url(cfg.output), (json.dumps(card, indent=1) + "\n").encode())
    from shardsmith.pipelines.report.fit import write_fit_report

    report = write_fit_report(cfg.output, card, data.y, rep.held_out)
    names = ", ".join(f"{k} {v:.4f}" for k, v in card["metrics"].items())
    log(f"fit-head: held-out {names} ({cfg.folds}-fold); wrote {cfg.output}, {cfg.output}.json and {report}")
    return card
