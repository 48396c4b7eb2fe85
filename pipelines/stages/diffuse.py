"""The diffusion stages (actor pool): one diffusers pipeline per actor, loaded once.

- ``GenerateStage`` reads image tasks (``shard, row, key, task, params_key``: every parameter and
  seed fixed up front by ``formats/prompts.py``; ``task`` is one task, or a list of tasks that
  share one batched forward) and writes one PNG per task.
- ``AugmentStage`` reads SAMPLE columns (``stages/batch.py``: the read stage's samples) and writes
  ``variants`` img2img images per source sample, each with its own derived seed.

Both write GENERATED columns: ``shard, row, key, png, caption, params (the KEY.json), error,
error_kind, shard_rows, node_id``. Within a batch, tasks are taken grouped by adapter set (LoRAs,
embeddings, ControlNet, refiner), then mode and parameters, so an actor switches adapters once
per group. Every task goes through ``prepare`` (its files read and hashed, its images fitted,
masked, padded, its control image made) and ``Diffuser.run``; ``shardsmith regenerate`` uses the
same two functions. Resources: one GPU per actor where the cluster has GPUs, fractional CPUs
otherwise; on CPU the torch thread count is part of the recipe (``KEY.json`` records it).
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np

from shardsmith.errors import version as shardsmith_version
from shardsmith.filters.augment import caption_dropped, target_size
from shardsmith.pipelines.config.generate import GenerateConfig
from shardsmith.pipelines.formats.prompts import IMAGE_MODES, ImageTask, derive_seed
from shardsmith.pipelines.formats.tar import PIL_FORMATS
from shardsmith.pipelines.stages.batch import SENTINEL, text

GENERATED = ("shard", "row", "key", "png", "caption", "params", "error", "error_kind", "shard_rows", "node_id")
UNSAFE = "unsafe_content"  # the error kind of an image the safety checker flagged


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pixels_sha256(img) -> str:
    """sha256 of an image's RGB pixels with its size: what "bit-identical" compares."""
    a = np.ascontiguousarray(np.asarray(img.convert("RGB")))
    return hashlib.sha256(f"{a.shape[1]}x{a.shape[0]}:".encode() + a.tobytes()).hexdigest()


def _decode(data: bytes, what: str):
    from PIL import Image

    from shardsmith.pipelines.formats.sources import SourceError

    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        img.load()
        return img
    except Exception as e:
        raise SourceError(f"unreadable {what}: {type(e).__name__}: {e}") from e


def prepare(task: ImageTask, diffuser, source: bytes | None = None):
    """(Request, inputs): the task's files read (``source``: the image bytes when the caller has
    them), hashed and made into the pipeline's inputs. Raises SourceError, ConditioningError,
    WeightsError or AdapterError for a row that cannot be made (its error row says which)."""
    from shardsmith.filters import conditioning as cond
    from shardsmith.filters.diffusion import Request, file_sha256
    from shardsmith.filters.weights import local_copy
    from shardsmith.pipelines.formats.sources import read_file, read_source, sha256

    inputs: dict = {}
    src = None
    needs_source = task.mode in IMAGE_MODES or (task.controlnet and task.control)
    if needs_source:
        data = source if source is not None else read_source(task.image, task.image_ref, "source image")
        src = _decode(data, "source image").convert("RGB")
        inputs["image"] = {"path": task.image, "ref": task.image_ref, "sha256": sha256(data),
                           "size": list(src.size)}
    width, height = task.width, task.height
    image = mask = None
    if task.mode in IMAGE_MODES:
        if width is None:
            width, height = cond.natural_size(*src.size)
        image = cond.fit(src, (width, height))
        if task.mode == "inpaint":
            if cond.is_mask_strategy(task.mask):
                mask = cond.strategy_mask(task.mask, (width, height), task.seed, task.key)
                inputs["mask"] = {"strategy": task.mask}
            else:
                data = read_file(task.mask, "mask")
                m = _decode(data, "mask")
                if m.size != src.size:
                    raise cond.ConditioningError(f"mask {task.mask!r} is {m.size[0]}x{m.size[1]}, the source image "
                                                 f"{src.size[0]}x{src.size[1]}: they must be the same size")
                mask = cond.as_mask(m, (width, height))
                inputs["mask"] = {"path": task.mask, "sha256": sha256(data), "size": list(m.size)}
        elif task.mode == "outpaint":
            image, mask = cond.outpaint_canvas(image, task.pad)
            width, height = image.size
    elif src is not None and width is None:
        width, height = cond.natural_size(*src.size)
    control = None
    if task.controlnet:
        if task.control_image:
            data = read_file(task.control_image, "control_image")
            control = cond.fit(_decode(data, "control_image").convert("RGB"), (width, height))
            inputs["control_image"] = {"path": task.control_image, "sha256": sha256(data)}
        else:
            control = cond.control_image(task.control, image if image is not None else cond.fit(src, (width, height)))
            inputs["control_image"] = {"detector": task.control}
    loras, tis = [], []
    for path, scale in task.lora:
        local = local_copy(path)
        loras.append((local, scale))
        inputs.setdefault("lora", []).append({"path": path, "scale": scale, "sha256": file_sha256(local)})
    for path, token in task.textual_inversion:
        local = local_copy(path)
        tis.append((local, token))
        inputs.setdefault("textual_inversion", []).append({"path": path, "token": token,
                                                           "sha256": file_sha256(local)})
    req = Request(task.mode, task.prompt, task.negative_prompt, task.seed, task.num_inference_steps,
                  task.guidance_scale, width, height, task.strength, image=image, mask=mask,
                  controlnet=task.controlnet, control_image=control,
                  control_scale=task.control_scale if task.control_scale is not None else 1.0,
                  loras=tuple(loras), textual_inversions=tuple(tis), refiner=task.refiner,
                  high_noise_frac=task.high_noise_frac)
    return req, inputs


def task_params(task: ImageTask) -> dict:
    """The parameters KEY.json lists at its top level (those the task's mode uses)."""
    p = {k: getattr(task, k) for k in ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale",
                                        "width", "height", "mode")}
    p.update(key=task.key, source_key=task.source_key)
    for k in ("strength", "image", "mask", "pad", "control_image", "control", "control_scale", "high_noise_frac"):
        if getattr(task, k) is not None:
            p[k] = getattr(task, k)
    if task.extra:
        p["extra"] = task.extra
    return p


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

    def finish(self, img) -> tuple[bytes, dict, str]:
        """Watermark (when on and the image is large enough) and encode as PNG; returns the PNG,
        the watermark's description and the sha256 of the pixels written."""
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
        return _png(img), info, pixels_sha256(img)

    def make(self, tasks: list[ImageTask], outs: list[dict], params: list[dict], sources: list | None = None,
             forward: bool = False) -> None:
        """Make ``tasks`` (one per-image call each, or one batched forward when ``forward``) and
        fill in their output rows: a PNG, or an error with its kind."""
        from shardsmith.filters.conditioning import ConditioningError
        from shardsmith.filters.diffusion import AdapterError, DiffusionError
        from shardsmith.filters.weights import WeightsError
        from shardsmith.pipelines.formats.sources import SourceError

        def fail(i, msg, kind="generation_error"):
            outs[i].update(error=msg, error_kind=kind, params=json.dumps(params[i]))

        ready = []
        for i, t in enumerate(tasks):
            params[i]["task"] = t.to_dict()
            if t.error:
                fail(i, t.error)
                continue
            try:
                req, inputs = prepare(t, self.diffuser, sources[i] if sources else None)
            except (SourceError, ConditioningError, WeightsError, AdapterError, DiffusionError) as e:
                fail(i, str(e))
                continue
            params[i].update(width=req.width, height=req.height, inputs=inputs)
            for what, model in (("controlnet", t.controlnet), ("refiner", t.refiner)):
                if model:
                    try:
                        params[i][what] = self.diffuser.model_info(model, what)
                    except DiffusionError as e:
                        fail(i, f"{what}: {e}")
                        break
            else:
                ready.append((i, req))
        calls = [ready] if forward and ready else [[x] for x in ready]
        for call in calls:
            if forward:
                members = [{"key": tasks[i].key, "prompt": tasks[i].prompt, "negative_prompt": tasks[i].negative_prompt,
                            "seed": tasks[i].seed} for i, _ in call]
                for pos, (i, _) in enumerate(call):
                    params[i]["forward"] = {"batch_size": len(call), "position": pos, "members": members}
            try:
                made = self.diffuser.run([req for _, req in call])
            except AdapterError as e:
                for i, _ in call:
                    fail(i, str(e))
                continue
            except Exception as e:  # a failing image never takes its shard down
                for i, _ in call:
                    fail(i, f"generation failed: {type(e).__name__}: {e}")
                continue
            for (i, _), m in zip(call, made):
                if m.nsfw is not None:
                    params[i]["nsfw_content_detected"] = m.nsfw
                if m.nsfw:
                    fail(i, "the safety checker flagged the image (nsfw_content_detected): not written", UNSAFE)
                    continue
                png, wm_info, pixels = self.finish(m.image)
                params[i].update(watermark=wm_info, png_sha256=hashlib.sha256(png).hexdigest(), pixels_sha256=pixels)
                outs[i].update(png=png, params=json.dumps(params[i]))


def _out_batch(rows: list[dict]) -> dict:
    return {c: np.array([r.get(c) for r in rows], dtype=object if c not in ("row", "shard_rows") else np.int64)
            for c in GENERATED}


class GenerateStage(_DiffusionStage):
    """Ray Data UDF (actor pool): task rows -> one PNG per task, in the order received."""

    def __call__(self, batch: dict) -> dict:
        rows = []
        n = len(batch["key"])
        order = sorted(range(n), key=lambda i: (str(batch["params_key"][i]), i))  # one adapter set, mode, params together
        for i in order:
            obj = json.loads(batch["task"][i])
            forward = isinstance(obj, list)  # a batched forward: [[row in shard, task], ...]
            members = obj if forward else [[int(batch["row"][i]), obj]]
            tasks = [ImageTask.from_dict(d) for _, d in members]
            outs = [{"shard": batch["shard"][i], "row": r, "key": t.key, "shard_rows": -1, "caption": t.prompt,
                     "node_id": self.node_id} for (r, _), t in zip(members, tasks)]
            params = [{**task_params(t), **self.model_info} for t in tasks]
            self.make(tasks, outs, params, forward=forward)
            rows.extend(outs)
        return _out_batch(rows)


class AugmentStage(_DiffusionStage):
    """Ray Data UDF (actor pool): source samples -> N img2img variants each (SDEdit), with a
    ControlNet (``controlnet`` + ``control``) for structure-preserving variants."""

    def __init__(self, spec, device: str, threads: int, watermark: bool, cfg: GenerateConfig,
                 shard_urls: dict | None = None):
        from shardsmith.pipelines.formats.prompts import parse_adapter_list

        super().__init__(spec, device, threads, watermark)
        self.cfg = cfg
        self.shard_urls = shard_urls or {}
        self.loras = parse_adapter_list(list(cfg.defaults.lora), "lora")[0]
        self.tis = parse_adapter_list(list(cfg.defaults.textual_inversion), "textual_inversion")[0]

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
            data = None if src_err else batch["image"][i]
            size = None
            if src_err is None:
                try:
                    image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
                    image.load()
                    size = target_size(*image.size, cfg.size, cfg.buckets, cfg.bucket_area, cfg.max_side)
                except Exception as e:
                    src_err = f"unreadable source image: {type(e).__name__}: {e}"
            prompt = cfg.prompt_template.format(caption=caption, key=src_key)
            tasks, outs, params = [], [], []
            for j in range(cfg.variants):
                key = f"{src_key}_v{j}"
                t = ImageTask(key, row, j, prompt, d.negative_prompt, derive_seed(d.seed, key), d.num_inference_steps,
                              d.guidance_scale, size[0] if size else None, size[1] if size else None, error=src_err,
                              source_key=src_key, source_shard=shard, mode="img2img", image=src_key,
                              image_ref={"url": self.shard_urls.get(shard), "key": src_key}, strength=cfg.strength,
                              controlnet=d.controlnet, control=d.control if d.controlnet else None,
                              control_scale=d.control_scale if d.controlnet else None,
                              lora=[list(x) for x in self.loras], textual_inversion=[list(x) for x in self.tis])
                dropped = caption_dropped(d.seed, key, cfg.caption_dropout)
                tasks.append(t)
                params.append({**task_params(t), "source_shard": shard, "variant": j, "caption_dropped": dropped,
                               **self.model_info})
                outs.append({"shard": shard, "row": row * cfg.variants + j, "key": key, "shard_rows": -1,
                             "caption": "" if dropped else caption, "node_id": self.node_id})
            self.make(tasks, outs, params, sources=[data] * len(tasks))
            rows.extend(outs)
        return _out_batch(rows)
