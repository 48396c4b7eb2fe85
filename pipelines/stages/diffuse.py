"""The diffusion stages (actor pool): one diffusers pipeline per actor, loaded once.

- ``GenerateStage`` reads image tasks (``shard, row, key, task, params_key``: every parameter and
  seed fixed up front by ``formats/prompts.py``) and writes one PNG per task.
- ``AugmentStage`` reads SAMPLE columns (``stages/batch.py``: the read stage's samples) and writes
  ``variants`` img2img images per source sample, each with its own derived seed.

Both write GENERATED columns: ``shard, row, key, png, caption, params (the KEY.json), error,
shard_rows, node_id``. Resources: one GPU per actor where the cluster has GPUs, fractional CPUs
otherwise; on CPU the torch thread count is part of the recipe (``KEY.json`` records it).
"""

from __future__ import annotations

import io
import json

import numpy as np

from shardsmith.errors import version as shardsmith_version
from shardsmith.filters.augment import caption_dropped, resize_cover, target_size
from shardsmith.pipelines.config.generate import GenerateConfig
from shardsmith.pipelines.formats.prompts import derive_seed
from shardsmith.pipelines.formats.tar import PIL_FORMATS
from shardsmith.pipelines.stages.batch import SENTINEL, text

GENERATED = ("shard", "row", "key", "png", "caption", "params", "error", "shard_rows", "node_id")


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
    return {c: np.array([r.get(c) for r in rows], dtype=object if c not in ("row", "shard_rows") else np.int64)
            for c in GENERATED}


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
                    image = Image.open(io.BytesIO(batch["image"][i]), formats=PIL_FORMATS)
                    image.load()
                    size = target_size(*image.size, cfg.size, cfg.buckets, cfg.bucket_area, cfg.max_side)
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
