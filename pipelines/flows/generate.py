"""Generate and augment on Ray: Stable Diffusion in an actor pool, webdataset shards out.

    generate: prompt table -> image tasks (every parameter and seed fixed up front) -> shards
              -> actor pool (pipeline loaded once per actor) -> driver -> writer task per shard
    augment:  input shards -> read (CPU tasks, as curate) -> actor pool (img2img, N variants per
              source) -> driver -> writer task per shard

Output shards are img2dataset-style (``NNNNN.tar`` with ``KEY.png``, ``KEY.txt``, ``KEY.json``
and ``NNNNN.parquet``) at the top of OUTPUT, so ``shardsmith curate OUTPUT ...`` reads them
straight back. Commit, ledger and resume are curate's (pipelines/ledger.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.core.dispatch import SENTINEL
from shardsmith.pipelines.flows.curate import text
from shardsmith.pipelines.core.ledger import Ledger, OutputLayout, shard_stats, shardsmith_version
from shardsmith.pipelines.formats.prompts import Defaults, derive_seed

OUTPUT_PARTS = ("_ledger", "_tmp", "manifest.json", "stats.json", "report.html", "report")


@dataclass
class GenerateConfig:
    output: str = ""
    model: str = ""
    prompts: str | None = None  # prompt table URL (generate)
    from_captions: str | None = None  # webdataset shards whose captions become prompts (generate)
    input: str | None = None  # webdataset shards to augment (augment)
    revision: str | None = None
    scheduler: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 4  # images per actor call, grouped per identical parameter set
    shard_size: int = 100  # images per output shard (generate)
    limit: int = 0  # generate: first N prompt rows; augment: first N samples per shard (0 = all)
    num_actors: int = 0
    actor_cpus: float = 0.0
    threads: int = 0  # torch threads per actor on CPU; 0 = torch's default in a plain process here
    watermark: bool = True
    defaults: Defaults = field(default_factory=Defaults)
    # augment
    strength: float = 0.5
    variants: int = 1
    prompt_template: str = "{caption}"
    caption_dropout: float = 0.0
    size: tuple[int, int] | None = None  # fixed output size (w, h)
    max_side: int = 512  # without size/buckets: long side scaled to this, sides multiples of 8
    buckets: bool = False  # SDXL-style aspect-ratio buckets of bucket_area pixels
    bucket_area: int = 1024 * 1024
    address: str | None = None
    overwrite: bool = False
    progress: bool = True

    def fingerprint(self, tool: str) -> dict:
        keep = ("model", "revision", "scheduler", "dtype", "watermark", "prompts", "from_captions", "input", "limit",
                "shard_size", "strength", "variants", "prompt_template", "caption_dropout", "size", "max_side",
                "buckets", "bucket_area")
        d = {k: getattr(self, k) for k in keep}
        d["defaults"] = asdict(self.defaults)
        d["tool"] = tool
        if tool == "augment":
            d.pop("shard_size")
        return json.loads(json.dumps(d))


# ---------------------------------------------------------------------------------------------
# Image sizes for augment: keep the aspect ratio, or snap to SDXL-style buckets
# ---------------------------------------------------------------------------------------------

BUCKET_RATIOS = (1.0, 9 / 7, 7 / 9, 19 / 13, 13 / 19, 7 / 4, 4 / 7, 12 / 5, 5 / 12)


def buckets_for_area(area: int) -> list[tuple[int, int]]:
    """(w, h) buckets of about ``area`` pixels; multiples of 64 (of 8 below 512x512)."""
    step = 64 if area >= 512 * 512 else 8
    out = []
    for r in BUCKET_RATIOS:
        w = max(step, round(math.sqrt(area * r) / step) * step)
        h = max(step, round(math.sqrt(area / r) / step) * step)
        out.append((w, h))
    return out


def target_size(w: int, h: int, cfg: GenerateConfig) -> tuple[int, int]:
    if cfg.size:
        return cfg.size
    if cfg.buckets:
        ratio = w / h
        return min(buckets_for_area(cfg.bucket_area), key=lambda b: abs(math.log((b[0] / b[1]) / ratio)))
    scale = cfg.max_side / max(w, h)
    return max(8, int(w * scale) // 8 * 8), max(8, int(h * scale) // 8 * 8)


def resize_cover(img, size: tuple[int, int]):
    """Resize to cover ``size`` then center-crop to it exactly."""
    from PIL import Image

    tw, th = size
    w, h = img.size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


def caption_dropped(run_seed: int, key: str, p: float) -> bool:
    if p <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(f"dropout:{run_seed}:{key}".encode()).digest()[:8], "big")
    return h / 2**64 < p


# ---------------------------------------------------------------------------------------------
# The actors
# ---------------------------------------------------------------------------------------------

def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class _DiffusionStage:
    """Holds one diffusers pipeline per actor; shared by the generate and augment stages."""

    def __init__(self, spec, device: str, threads: int, watermark: bool):
        import torch

        from shardsmith.filters.diffusion import Diffuser
        from shardsmith.pipelines.core.resources import node_id

        torch.set_num_threads(threads)
        device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        self.diffuser = Diffuser(spec, device=device)
        self.watermark = watermark
        self.model_info = {**self.diffuser.describe(), "shardsmith_version": shardsmith_version()}
        if not device.startswith("cuda"):
            # CPU kernels reduce in a thread-count-dependent order: the same seed gives the same
            # image only with the same number of threads, so it is part of the recipe.
            self.model_info["torch_threads"] = threads
        self.node_id = node_id()

    def finish(self, img) -> tuple[bytes, dict]:
        """Watermark (when on and the image is large enough) and encode as PNG."""
        from PIL import Image

        from shardsmith.filters import watermark as wm

        info = None
        if self.watermark:
            if wm.can_carry(*img.size):
                img = Image.fromarray(wm.embed(np.asarray(img.convert("RGB"))))
                info = wm.describe()
            else:
                info = {**wm.describe(), "applied": False,
                        "why": f"image {img.size[0]}x{img.size[1]} is below {wm.MIN_SIDE}x{wm.MIN_SIDE}"}
        return _png(img), info


def _out_batch(rows: list[dict]) -> dict:
    cols = ("shard", "row", "key", "png", "caption", "params", "error", "shard_rows", "node_id")
    return {c: np.array([r.get(c) for r in rows], dtype=object if c not in ("row", "shard_rows") else np.int64)
            for c in cols}


class GenerateStage(_DiffusionStage):
    """Ray Data UDF (actor pool): task rows -> one PNG per task, in the order received."""

    def __call__(self, batch: dict) -> dict:
        rows = []
        n = len(batch["key"])
        order = sorted(range(n), key=lambda i: (str(batch["params_key"][i]), i))  # identical parameters together
        for i in order:
            task = json.loads(batch["task"][i])
            out = {"shard": batch["shard"][i], "row": int(batch["row"][i]), "key": task["key"], "shard_rows": -1,
                   "caption": task["prompt"], "node_id": self.node_id}
            params = {k: task[k] for k in ("prompt", "negative_prompt", "seed", "num_inference_steps",
                                            "guidance_scale", "width", "height")}
            params.update(self.model_info, key=task["key"], source_key=task.get("source_key"))
            if task.get("error"):
                out.update(error=task["error"], params=json.dumps(params))
                rows.append(out)
                continue
            try:
                img = self.diffuser.txt2img(task["prompt"], task["negative_prompt"], task["seed"],
                                            task["num_inference_steps"], task["guidance_scale"], task["width"],
                                            task["height"])
                png, wm_info = self.finish(img)
                params["watermark"] = wm_info
                out.update(png=png, params=json.dumps(params))
            except Exception as e:  # a failing image never takes its shard down
                out.update(error=f"generation failed: {type(e).__name__}: {e}", params=json.dumps(params))
            rows.append(out)
        return _out_batch(rows)


class AugmentStage(_DiffusionStage):
    """Ray Data UDF (actor pool): source samples -> N img2img variants each (SDEdit)."""

    def __init__(self, spec, device: str, threads: int, watermark: bool, cfg: GenerateConfig):
        super().__init__(spec, device, threads, watermark)
        self.cfg = cfg

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        cfg, d = self.cfg, self.cfg.defaults
        rows = []
        for i in range(len(batch["row"])):
            shard, row = batch["shard"][i], int(batch["row"][i])
            if row == SENTINEL:
                rows.append({"shard": shard, "row": SENTINEL, "shard_rows": int(batch["shard_rows"][i]) * cfg.variants})
                continue
            src_key = batch["key"][i]
            caption = text(batch["caption"][i]) or ""
            src_err = (text(batch["error"][i]) or "unreadable sample") if text(batch["error_kind"][i]) else None
            size = source = None
            if src_err is None:
                try:
                    image = Image.open(io.BytesIO(batch["image"][i]))
                    image.load()
                    size = target_size(*image.size, cfg)
                    source = resize_cover(image.convert("RGB"), size)
                except Exception as e:
                    src_err, size, source = f"unreadable source image: {type(e).__name__}: {e}", None, None
            prompt = cfg.prompt_template.format(caption=caption, key=src_key)
            for j in range(cfg.variants):
                key = f"{src_key}_v{j}"
                seed = derive_seed(d.seed, key)
                dropped = caption_dropped(d.seed, key, cfg.caption_dropout)
                params = {"prompt": prompt, "negative_prompt": d.negative_prompt, "seed": seed,
                          "num_inference_steps": d.num_inference_steps, "guidance_scale": d.guidance_scale,
                          "strength": cfg.strength, "width": size[0] if size else None,
                          "height": size[1] if size else None, "source_key": src_key, "source_shard": shard,
                          "variant": j, "caption_dropped": dropped, "key": key, **self.model_info}
                out = {"shard": shard, "row": row * cfg.variants + j, "key": key, "shard_rows": -1,
                       "caption": "" if dropped else caption, "node_id": self.node_id}
                if src_err:
                    out.update(error=src_err, params=json.dumps(params))
                    rows.append(out)
                    continue
                try:
                    img = self.diffuser.img2img(source, prompt, d.negative_prompt, seed, d.num_inference_steps,
                                                d.guidance_scale, cfg.strength)
                    png, wm_info = self.finish(img)
                    params["watermark"] = wm_info
                    out.update(png=png, params=json.dumps(params))
                except Exception as e:
                    out.update(error=f"img2img failed: {type(e).__name__}: {e}", params=json.dumps(params))
                rows.append(out)
        return _out_batch(rows)


# ---------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------

def write_generated_shard(name: str, rows: pa.Table, out_root: str, extra: dict | None = None) -> dict:
    """KEY.png + KEY.txt + KEY.json for each made image, in row order, plus the parquet index with
    every row (status success | error, img2dataset's columns), then the ledger commit."""
    import pyarrow.parquet as pq

    layout = OutputLayout(out_root)
    tmp = layout.tmp_dir
    recs = rows.sort_by("row").to_pylist() if rows is not None else []
    with fsutil.atomic_write(layout.path(f"{name}.tar"), tmp_dir=tmp) as f, \
            tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for r in recs:
            if r["png"] is None:
                continue
            params = json.loads(r["params"])
            meta = {**params, "status": "success", "caption": r["caption"]}
            for ext, data in (("png", r["png"]), ("txt", (r["caption"] or "").encode()),
                              ("json", json.dumps(meta, sort_keys=True).encode())):
                info = tarfile.TarInfo(f"{r['key']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    index = []
    for r in recs:
        p = json.loads(r["params"])
        index.append({"key": r["key"], "caption": r["caption"], "prompt": p.get("prompt"),
                      "status": "success" if r["png"] is not None else "error", "error_message": r["error"],
                      "width": p.get("width"), "height": p.get("height"), "seed": p.get("seed"),
                      "num_inference_steps": p.get("num_inference_steps"), "guidance_scale": p.get("guidance_scale"),
                      "negative_prompt": p.get("negative_prompt"), "source_key": p.get("source_key"),
                      "sha256": hashlib.sha256(r["png"]).hexdigest() if r["png"] is not None else None})
    schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("prompt", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int64()),
                        ("height", pa.int64()), ("seed", pa.int64()), ("num_inference_steps", pa.int64()),
                        ("guidance_scale", pa.float64()), ("negative_prompt", pa.string()),
                        ("source_key", pa.string()), ("sha256", pa.string())])
    with fsutil.atomic_write(layout.path(f"{name}.parquet"), tmp_dir=tmp) as f:
        pq.write_table(pa.Table.from_pylist(index, schema=schema), f, compression="zstd")
    status = ["kept" if r["png"] is not None else "error" for r in recs]
    reason = [None if r["png"] is not None else "generation_error" for r in recs]
    stats = shard_stats(status, reason)
    nodes = sorted({r["node_id"] for r in recs if r.get("node_id")})
    entry = {**stats, "generated": stats["kept"], "outputs": [f"{name}.tar", f"{name}.parquet"],
             "node_ids": nodes, **(extra or {})}
    Ledger(layout).commit(name, entry)
    return entry


# ---------------------------------------------------------------------------------------------
# The drivers
# ---------------------------------------------------------------------------------------------

def _plan(cfg: GenerateConfig):
    """Actors and their torch threads. On CPU the thread count defaults to what torch uses in a
    plain process here (Ray would set 1), so that images equal a direct diffusers call's."""
    import dataclasses

    import torch

    from shardsmith.pipelines.core.resources import cluster_resources, node_cpus, plan_resources

    cpus, gpus = cluster_resources()
    plan = plan_resources(cpus, gpus, cfg.device, cfg.num_actors, cfg.actor_cpus, nodes=node_cpus())
    if plan.device == "cpu":
        plan = dataclasses.replace(plan, torch_threads=cfg.threads or torch.get_num_threads())
    return plan


def _finish(layout, names: list[str], manifest: dict, t0: float, tool: str, log) -> dict:
    from shardsmith.pipelines.core.ledger import aggregate, write_json
    from shardsmith.pipelines.core.progress import summary

    entries = Ledger(layout).committed()
    missing = [n for n in names if n not in entries]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) were not committed: {', '.join(missing[:10])}; rerun to resume")
    stats = aggregate({n: entries[n] for n in names})
    stats["generated"] = stats["kept"]
    stats["seconds_this_run"] = round(time.time() - t0, 3)
    write_json(layout.stats, stats, tmp_dir=layout.tmp_dir)
    manifest["finished_at"] = time.time()
    write_json(layout.manifest, manifest, tmp_dir=layout.tmp_dir)
    Ledger(layout).clean_tmp()
    log(summary({**stats, "dropped": 0}, f"\n{tool} summary ({len(names)} shards; kept = images made)",
                [f"\noutputs in {layout.root}: NNNNN.tar + NNNNN.parquet (curate reads them back), stats.json"]))
    return stats


def _start(cfg: GenerateConfig, tool: str, models: dict, inputs: list, names: list[str]):
    """Check/start the run manifest, clean what an interrupted run left; (layout, manifest, committed)."""
    from shardsmith.pipelines.core.ledger import start_run

    layout = OutputLayout(cfg.output)
    parts = OUTPUT_PARTS + tuple(f"{n}.{e}" for n in names for e in ("tar", "parquet"))
    manifest = start_run(layout, f"shardsmith {tool}", cfg.fingerprint(tool), _config_dict(cfg), models, inputs,
                         cfg.overwrite, parts)
    ledger = Ledger(layout)
    ledger.clean_tmp()
    return layout, manifest, set(ledger.committed())


def _diffuse_and_write(ds, stage, stage_args: tuple, plan, cfg: GenerateConfig, progress, collector) -> None:
    """The tail of generate and augment: ``stage`` (one diffusers pipeline per actor) over ``ds``,
    each complete shard handed to a writer task that commits it."""
    import ray
    from ray.data import ActorPoolStrategy

    from shardsmith.pipelines.core.dispatch import drive

    ds = ds.map_batches(stage, fn_constructor_args=stage_args,
                        compute=ActorPoolStrategy(min_size=1, max_size=plan.num_actors),
                        batch_size=cfg.batch_size, num_cpus=plan.actor_cpus, num_gpus=plan.actor_gpus)
    writer = ray.remote(num_cpus=plan.write_cpus, max_retries=3)(write_generated_shard)
    drive(ds.iter_batches(batch_size=None, batch_format="pyarrow"), collector,
          lambda name, rows: writer.remote(name, rows, cfg.output), progress)


def run_generate(cfg: GenerateConfig, log=print) -> dict:
    import ray

    from shardsmith.filters.diffusion import DiffusionSpec, describe_model
    from shardsmith.pipelines.core.dispatch import ShardCollector
    from shardsmith.pipelines.core.progress import Progress
    from shardsmith.pipelines.formats.prompts import plan_tasks, read_prompt_table, shard_tasks
    from shardsmith.pipelines.core.resources import ray_session

    spec = DiffusionSpec(cfg.model, cfg.revision, cfg.scheduler, cfg.dtype)
    spec.validate()
    table = read_prompt_table(cfg.prompts) if cfg.prompts else captions_table(cfg.from_captions, cfg.limit)
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    tasks = plan_tasks(table, cfg.defaults)
    shards = shard_tasks(tasks, cfg.shard_size)
    layout, manifest, committed = _start(cfg, "generate", describe_model(spec), [cfg.prompts or cfg.from_captions],
                                         list(shards))
    todo = {n: ts for n, ts in shards.items() if n not in committed}
    log(f"shardsmith generate: {len(tasks)} image(s) from {len(table)} prompt row(s) in {len(shards)} shard(s); "
        f"{len(shards) - len(todo)} already committed, {len(todo)} to do")
    t0 = time.time()
    if todo:
        with ray_session(cfg.address):
            plan = _plan(cfg)
            log(f"ray: {plan.describe()}")
            items = []
            for name, ts in todo.items():
                for i, t in enumerate(ts):
                    items.append({"shard": name, "row": i, "key": t.key, "task": json.dumps(t.to_dict()),
                                  "params_key": json.dumps(t.params())})
            # tasks of one parameter set next to each other, so that batches are homogeneous
            items.sort(key=lambda it: (it["shard"], it["params_key"], it["row"]))
            ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // max(cfg.batch_size, 1), 200)))
            _diffuse_and_write(ds, GenerateStage, (spec, plan.device, plan.torch_threads, cfg.watermark), plan, cfg,
                               Progress("generate", len(items), len(todo), enabled=cfg.progress),
                               ShardCollector({n: len(ts) for n, ts in todo.items()}))
    return _finish(layout, list(shards), manifest, t0, "generate", log)


def run_augment(cfg: GenerateConfig, log=print) -> dict:
    import ray

    from shardsmith.filters.diffusion import DiffusionSpec, describe_model
    from shardsmith.pipelines.core.dispatch import ShardCollector
    from shardsmith.pipelines.flows.curate import read_shard_rows  # the same reader as curate
    from shardsmith.pipelines.core.progress import Progress
    from shardsmith.pipelines.core.resources import TASK_STAGE_ARGS, ray_session
    from shardsmith.pipelines.formats.inputs import plan_shards

    if not 0 < cfg.strength <= 1:
        raise ValueError(f"--strength {cfg.strength}: must be in (0, 1]")
    if not 1 <= cfg.variants <= 64:
        raise ValueError(f"--variants {cfg.variants}: must be in 1..64")
    if not 0 <= cfg.caption_dropout <= 1:
        raise ValueError(f"--caption-dropout {cfg.caption_dropout}: must be in [0, 1]")
    spec = DiffusionSpec(cfg.model, cfg.revision, cfg.scheduler, cfg.dtype)
    spec.validate()
    _, shards = plan_shards(cfg.input, "images")
    layout, manifest, committed = _start(cfg, "augment", describe_model(spec), [s.to_dict() for s in shards],
                                         [s.name for s in shards])
    todo = [s for s in shards if s.name not in committed]
    log(f"shardsmith augment: {len(shards)} shard(s), {cfg.variants} variant(s) per image; "
        f"{len(shards) - len(todo)} already committed, {len(todo)} to do")
    t0 = time.time()
    if todo:
        with ray_session(cfg.address):
            plan = _plan(cfg)
            log(f"ray: {plan.describe()}")
            ds = ray.data.from_items([{"shard": s.name, "url": s.url, "limit": cfg.limit} for s in todo],
                                     override_num_blocks=len(todo))
            ds = ds.map_batches(read_shard_rows, batch_size=1, num_cpus=plan.read_cpus, **TASK_STAGE_ARGS)
            _diffuse_and_write(ds, AugmentStage, (spec, plan.device, plan.torch_threads, cfg.watermark, cfg), plan, cfg,
                               Progress("augment", None, len(todo), enabled=cfg.progress), ShardCollector())
    return _finish(layout, [s.name for s in shards], manifest, t0, "augment", log)


def captions_table(url: str, limit: int = 0) -> pa.Table:
    """Prompts from a (curated) webdataset: one row per sample with a caption; keys link back."""
    from shardsmith.pipelines.formats.tar import iter_tar_samples
    from shardsmith.pipelines.formats.inputs import plan_shards

    _, shards = plan_shards(url, "images")
    rows = []
    for s in shards:
        if limit and len(rows) >= limit:
            break
        for sample in iter_tar_samples(s.url):
            if limit and len(rows) >= limit:
                break
            cap = sample.caption()
            rows.append({"key": sample.key, "prompt": cap, "source_key": sample.key, "source_shard": s.name})
    return pa.Table.from_pylist(rows, schema=pa.schema([("key", pa.string()), ("prompt", pa.string()),
                                                        ("source_key", pa.string()), ("source_shard", pa.string())]))


def _config_dict(cfg: GenerateConfig) -> dict:
    d = asdict(cfg)
    d.pop("overwrite", None)
    return json.loads(json.dumps(d))
