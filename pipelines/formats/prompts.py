"""Prompt tables -> the list of images to make, each with every parameter fixed.

A prompt table is parquet, jsonl or csv (any fsspec URL) with ``prompt`` (required) and optional
per-row ``key``, ``negative_prompt``, ``seed``, ``num_inference_steps``, ``guidance_scale``,
``width``, ``height``, ``num_images``, and the columns of the other modes and adapters
(``ROW_COLUMNS``: ``mode``, ``image``, ``mask``, ``strength``, ``pad``, ``controlnet``,
``control_image``, ``control``, ``control_scale``, ``lora``, ``textual_inversion``, ``refiner``,
``high_noise_frac``); the CLI gives the defaults. A column not listed is an error before any work
(``check_columns``), unless the run names it in ``extra_columns``: then its values are copied into
each image's KEY.json. A row asking for N images yields N samples ``KEY_0 .. KEY_{N-1}`` with seeds
``s, s+1, ...`` (each reproducible alone with a direct diffusers call and that seed). A row without
a seed gets one derived from the run seed and its key, so it never depends on batching, workers or
resumes.

Bad rows are not dropped: they become samples with an error message (no prompt, a step count
that is not a whole number in 1..1000, a size not divisible by 8, an inpaint row without a mask,
an image given to a mode that does not use it, ...).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from shardsmith.errors import InputError
from shardsmith.pipelines.core import fs as fsutil

PROMPT_COLUMNS = ("key", "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "width",
                  "height", "num_images")
# the other modes and the adapters, per row (each also has a run-wide default)
ROW_COLUMNS = ("mode", "image", "mask", "strength", "pad", "controlnet", "control_image", "control", "control_scale",
               "lora", "textual_inversion", "refiner", "high_noise_frac")
LINK_COLUMNS = ("source_key", "source_shard")  # --from-captions: where a prompt came from
KNOWN_COLUMNS = PROMPT_COLUMNS + ROW_COLUMNS + LINK_COLUMNS
MODES = ("txt2img", "img2img", "inpaint", "outpaint")
IMAGE_MODES = ("img2img", "inpaint", "outpaint")
MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_IMAGES_PER_ROW = 64
SEED_LIMIT = 2**63
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-/]+$")


class PromptError(InputError):
    """A prompt table that cannot be read at all (the message names the file)."""


@dataclass(frozen=True)
class Defaults:
    negative_prompt: str = ""
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    num_images: int = 1
    seed: int = 0  # the run seed, from which row seeds are derived
    # the defaults of ROW_COLUMNS (added later: the run fingerprint lists them only when set)
    mode: str = "auto"  # auto: outpaint with a pad, inpaint with a mask, img2img with an image, else txt2img
    mask: str | None = None
    strength: float | None = None  # None: diffusers' own (img2img 0.8, inpaint/outpaint 1.0)
    pad: str | None = None
    controlnet: str | None = None
    control_image: str | None = None
    control: str | None = None  # a detector applied to the source image: canny[:LOW,HIGH]
    control_scale: float = 1.0
    lora: tuple[str, ...] = ()  # ("path[:scale]", ...)
    textual_inversion: tuple[str, ...] = ()  # ("path[:token]", ...)
    refiner: str | None = None
    high_noise_frac: float = 0.8

    def changed(self) -> dict:
        """The fields that differ from their defaults (the later fields, for the run fingerprint)."""
        base = Defaults()
        return {k: v for k, v in asdict(self).items() if v != getattr(base, k)}


DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0, "outpaint": 1.0}


@dataclass
class ImageTask:
    key: str
    row: int  # position in the prompt table
    index: int  # image number within the row
    prompt: str | None
    negative_prompt: str
    seed: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    width: int | None
    height: int | None
    error: str | None = None
    source_key: str | None = None
    source_shard: str | None = None
    mode: str = "txt2img"
    image: str | None = None  # a path/URL, or a key of the run's image webdataset (then image_ref says where)
    image_ref: dict | None = None  # {"url": tar, "member": name, "offset": o, "size": n} of a webdataset sample
    mask: str | None = None  # a path/URL or a strategy (filters/conditioning.py)
    strength: float | None = None
    pad: str | None = None
    controlnet: str | None = None
    control_image: str | None = None
    control: str | None = None
    control_scale: float | None = None
    lora: list = field(default_factory=list)  # [[path, scale], ...]
    textual_inversion: list = field(default_factory=list)  # [[path, token or None], ...]
    refiner: str | None = None
    high_noise_frac: float | None = None
    extra: dict | None = None  # extra_columns' values, copied into KEY.json

    def params(self) -> tuple:
        """The parameter set that must be identical for images to share a batch."""
        return (self.num_inference_steps, self.guidance_scale, self.width, self.height)

    def adapters(self) -> tuple:
        """What an actor loads for this task beside its base pipeline: rows are grouped by it."""
        return (tuple(map(tuple, self.lora)), tuple(map(tuple, self.textual_inversion)), self.controlnet or "",
                self.refiner or "")

    def group(self) -> str:
        """Sort key that puts tasks of one adapter set, mode and parameter set together."""
        return json.dumps([self.adapters(), self.mode, self.params()])

    def forward_key(self) -> str | None:
        """Tasks with equal keys may share one batched forward (``batch_forward``): txt2img
        without a ControlNet or refiner, same parameters and adapters; None: a call of its own."""
        if self.error or self.mode != "txt2img" or self.controlnet or self.refiner:
            return None
        return self.group()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageTask":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def derive_seed(run_seed: int, key: str) -> int:
    digest = hashlib.sha256(f"shardsmith:{run_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_LIMIT


def read_prompt_table(url: str) -> pa.Table:
    """parquet / jsonl / csv, chosen by extension."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    try:
        with fsutil.open_file(url, "rb") as f:
            if url.endswith(".parquet"):
                t = pq.read_table(f, use_threads=False)
            elif url.endswith((".jsonl", ".json", ".ndjson")):
                t = pjson.read_json(f)
            elif url.endswith((".csv", ".tsv")):
                t = pcsv.read_csv(f, parse_options=pcsv.ParseOptions(delimiter="\t" if url.endswith(".tsv") else ","))
            else:
                raise PromptError(f"{url}: unknown prompt table format (use .parquet, .jsonl or .csv)")
    except FileNotFoundError as e:
        raise PromptError(f"{url}: prompt table not found") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise PromptError(f"{url}: cannot read the prompt table: {e}") from e
    if "prompt" not in t.column_names:
        raise PromptError(f"{url}: missing column 'prompt'; the table has: {', '.join(t.column_names)}")
    return t


def _int_or_error(value, name: str, lo: int, hi: int) -> tuple[int | None, str | None]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        return None, f"{name}={value!r} is not a whole number"
    v = int(value)
    if not lo <= v <= hi:
        return None, f"{name}={v} is outside {lo}..{hi}"
    return v, None


def task_from_row(row: dict, index_in_table: int, d: Defaults, extra_columns: tuple = ()) -> list[ImageTask]:
    """One prompt-table row -> its image tasks (error tasks for a bad row, never none)."""
    raw_key = row.get("key")
    key = str(raw_key) if raw_key not in (None, "") else f"{index_in_table:08d}"
    errors: list[str] = []
    if not _KEY_OK.match(key) or ".." in key:
        errors.append(f"key {key!r} may only hold letters, digits, '_', '-' and '/'")
        key = f"{index_in_table:08d}"
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        errors.append("no prompt (empty or missing)")
        prompt = prompt if isinstance(prompt, str) else None
    neg = row.get("negative_prompt")
    neg = d.negative_prompt if neg is None else str(neg)
    steps, e = _int_or_error(row.get("num_inference_steps"), "num_inference_steps", 1, MAX_STEPS)
    errors += [e] if e else []
    n, e = _int_or_error(row.get("num_images"), "num_images", 1, MAX_IMAGES_PER_ROW)
    errors += [e] if e else []
    seed, e = _int_or_error(row.get("seed"), "seed", 0, SEED_LIMIT - MAX_IMAGES_PER_ROW)
    errors += [e] if e else []
    sizes = {}
    for name, default in (("width", d.width), ("height", d.height)):
        v, e = _int_or_error(row.get(name), name, 8, MAX_SIDE)
        if e:
            errors.append(e)
        v = default if v is None else v
        if v % 8:
            errors.append(f"{name}={v} is not divisible by 8")
        sizes[name] = v
    g = row.get("guidance_scale")
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0 or g > 100):
        errors.append(f"guidance_scale={g!r} is not a number in 0..100")
        g = None
    steps = d.num_inference_steps if steps is None else steps
    g = d.guidance_scale if g is None else float(g)
    n = d.num_images if n is None else n
    fields, mode_errors = mode_fields(row, d)
    errors += mode_errors
    if fields["mode"] in IMAGE_MODES:
        # the output size follows the source image unless the row sets one (filled in by the actor)
        given = [name for name in ("width", "height") if row.get(name) is not None]
        if fields["mode"] == "outpaint" and given:
            errors.append("mode outpaint takes its canvas size from pad (WxH or left,top,right,bottom), not "
                          + "/".join(given))
        elif len(given) == 1:
            errors.append(f"{given[0]} without {'height' if given[0] == 'width' else 'width'}: give both (the "
                          "source is fitted to that size) or neither (the source's own size)")
        if len(given) < 2 or fields["mode"] == "outpaint":
            sizes = {"width": None, "height": None}
    extra = {c: _jsonable(row.get(c)) for c in extra_columns} if extra_columns else None
    base_seed = seed
    tasks = []
    for j in range(n):
        k = key if n == 1 else f"{key}_{j}"
        s = (base_seed + j) if base_seed is not None else derive_seed(d.seed, k)
        tasks.append(ImageTask(k, index_in_table, j, prompt, neg, s, steps, g, sizes["width"], sizes["height"],
                               "; ".join(errors) or None, row.get("source_key"), row.get("source_shard"),
                               extra=extra, **fields))
    return tasks


def _jsonable(v):
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)


def _given(row: dict, name: str):
    """A row's value of ``name``, None when absent, null, NaN or an empty string."""
    v = row.get(name)
    if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, (list, tuple)) and not v:
        return None
    return v


def _number(v, name: str, lo: float, hi: float, lo_open: bool = False) -> tuple[float | None, str | None]:
    if v is None:
        return None, None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None, f"{name}={v!r} is not a number"
    if v < lo or v > hi or (lo_open and v == lo):
        return None, f"{name}={v} is outside {'(' if lo_open else '['}{lo}, {hi}]"
    return float(v), None


def split_suffix(item: str) -> tuple[str, str | None]:
    """``path[:suffix]``: the suffix is what follows the last ':' when it holds no '/' (so that
    ``s3://b/x.safetensors`` has none and ``s3://b/x.safetensors:0.8`` has ``0.8``)."""
    head, sep, tail = item.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail:
        return head, tail
    return item, None


def parse_adapter_list(value, kind: str) -> tuple[list, list[str]]:
    """``lora``: ``path[:scale]`` items; ``textual_inversion``: ``path[:token]`` items; separated by
    ';' in a string, or a list column."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(";")
    out, errors = [], []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        path, suffix = split_suffix(item)
        if kind == "lora":
            scale = 1.0
            if suffix is not None:
                try:
                    scale = float(suffix)
                except ValueError:
                    errors.append(f"lora {item!r}: the scale after ':' is not a number")
                    continue
                if not math.isfinite(scale) or abs(scale) > 10:
                    errors.append(f"lora {item!r}: scale {suffix} is outside -10..10")
                    continue
            out.append([path, scale])
        else:
            out.append([path, suffix])
    if kind == "lora" and len({p for p, _ in out}) < len(out):
        errors.append("lora: the same file is listed twice")
    return out, errors


# which row columns each mode uses (beside the prompt columns)
_USES = {
    "txt2img": {"controlnet", "control_image", "control", "control_scale", "lora", "textual_inversion", "refiner",
                "high_noise_frac"},
    "img2img": {"image", "strength", "controlnet", "control_image", "control", "control_scale", "lora",
                "textual_inversion", "refiner", "high_noise_frac"},
    "inpaint": {"image", "mask", "strength", "controlnet", "control_image", "control", "control_scale", "lora",
                "textual_inversion"},
    "outpaint": {"image", "pad", "strength", "controlnet", "control_image", "control", "control_scale", "lora",
                 "textual_inversion"},
}


def mode_fields(row: dict, d: Defaults) -> tuple[dict, list[str]]:
    """The mode of a row and the fields of ImageTask it sets, with what is wrong with them. A value
    the row gives to a column its mode does not use is an error (never silently ignored); a
    run-wide default that does not apply to a row's mode is simply not used."""
    from shardsmith.filters.conditioning import ConditioningError, check_mask_strategy, parse_detector, parse_pad

    errors: list[str] = []
    row_v = {c: _given(row, c) for c in ROW_COLUMNS}
    eff = {c: row_v[c] if row_v[c] is not None else getattr(d, c, None) for c in ROW_COLUMNS if c != "image"}
    for c in ("lora", "textual_inversion"):
        eff[c] = row_v[c] if row_v[c] is not None else list(getattr(d, c))
    image = row_v["image"]
    mode = eff["mode"]
    if mode == "auto":
        mode = ("outpaint" if eff["pad"] else "inpaint" if eff["mask"] else "img2img") if image else "txt2img"
    if mode not in MODES:
        return {"mode": str(mode)}, [f"mode {mode!r}: one of {', '.join(MODES)} (or auto)"]
    out: dict = {"mode": mode}
    uses = _USES[mode]
    for c, v in row_v.items():
        if v is None or c == "mode":
            continue
        if c == "image" and mode == "txt2img":
            if not (eff["controlnet"] and eff["control"] and not eff["control_image"]):
                errors.append(f"mode txt2img does not use image={v!r} (img2img, inpaint or outpaint do; a "
                              "ControlNet with a detector in 'control' takes it as its source)")
        elif c in ("mask", "pad") and image is None:
            errors.append(f"{c}={v!r} needs an image to {'inpaint' if c == 'mask' else 'outpaint'}")
        elif c not in uses:
            errors.append(f"mode {mode} does not use {c}={v!r}" + (f" (use mode {'inpaint' if c == 'mask' else 'outpaint'})"
                                                                  if c in ("mask", "pad") else ""))
    if image is not None:
        out["image"] = str(image)
    if mode in IMAGE_MODES and image is None:
        errors.append(f"mode {mode} needs an image (a path/URL or a key of the image webdataset)")
    if mode in IMAGE_MODES:
        strength, e = _number(eff["strength"], "strength", 0.0, 1.0, lo_open=True)
        errors += [e] if e else []
        out["strength"] = strength if strength is not None else DEFAULT_STRENGTH[mode]
    if mode == "inpaint":
        if eff["mask"] is None:
            errors.append("mode inpaint needs a mask (a path/URL, random-box, center or border:PX)")
        else:
            out["mask"] = str(eff["mask"])
            e = check_mask_strategy(out["mask"])
            errors += [e] if e else []
    if mode == "outpaint":
        if eff["pad"] is None:
            errors.append("mode outpaint needs pad (left,top,right,bottom or WxH)")
        else:
            out["pad"] = str(eff["pad"])
            try:
                parse_pad(out["pad"])
            except ConditioningError as e:
                errors.append(str(e))
    if eff["controlnet"]:
        out["controlnet"] = str(eff["controlnet"])
        if eff["control_image"] and eff["control"]:
            errors.append("controlnet: give control_image or a detector in control, not both")
        elif eff["control_image"]:
            out["control_image"] = str(eff["control_image"])
        elif eff["control"]:
            out["control"] = str(eff["control"])
            try:
                parse_detector(out["control"])
            except ConditioningError as e:
                errors.append(str(e))
            if image is None:
                errors.append(f"control {out['control']!r} is applied to the source image, and the row has none")
        else:
            errors.append("controlnet needs control_image (a path/URL) or control (a detector, e.g. canny)")
        scale, e = _number(eff["control_scale"], "control_scale", 0.0, 10.0)
        errors += [e] if e else []
        out["control_scale"] = scale
    else:
        for c in ("control_image", "control", "control_scale"):
            if row_v[c] is not None:
                errors.append(f"{c} is given without a controlnet")
    for c in ("lora", "textual_inversion"):
        if eff[c]:
            out[c], errs = parse_adapter_list(eff[c], c)
            errors += errs
    if eff["refiner"]:
        if mode not in ("txt2img", "img2img"):
            errors.append(f"refiner: supported with txt2img and img2img, not {mode}")
        else:
            out["refiner"] = str(eff["refiner"])
            frac, e = _number(eff["high_noise_frac"], "high_noise_frac", 0.0, 1.0, lo_open=True)
            if e or frac == 1.0:
                errors.append(e or "high_noise_frac=1.0 leaves the refiner nothing to do")
            out["high_noise_frac"] = frac
    elif row_v["high_noise_frac"] is not None:
        errors.append("high_noise_frac is given without a refiner")
    return out, errors


def check_columns(table: pa.Table, extra_columns=(), url: str = "the prompt table") -> None:
    """Every column is one the job uses, or named in ``extra_columns`` (copied into KEY.json):
    a column that would be ignored is an error before any work, naming it and the known ones."""
    extra = tuple(extra_columns or ())
    clash = [c for c in extra if c in KNOWN_COLUMNS]
    if clash:
        raise PromptError(f"extra_columns: {', '.join(clash)} {'is a column' if len(clash) == 1 else 'are columns'} "
                          "the job uses; list only pass-through metadata there")
    absent = [c for c in extra if c not in table.column_names]
    if absent:
        raise PromptError(f"extra_columns: {', '.join(absent)} not in {url} (it has: {', '.join(table.column_names)})")
    unknown = [c for c in table.column_names if c not in KNOWN_COLUMNS and c not in extra]
    if unknown:
        raise PromptError(f"{url}: unknown column{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                          f"known columns are {', '.join(KNOWN_COLUMNS)}; to copy other columns into KEY.json "
                          "list them in extra_columns (--extra-columns)")


def plan_tasks(table: pa.Table, d: Defaults, extra_columns=()) -> list[ImageTask]:
    tasks: list[ImageTask] = []
    for i, row in enumerate(table.to_pylist()):
        tasks.extend(task_from_row(row, i, d, tuple(extra_columns or ())))
    seen: set[str] = set()
    for t in tasks:
        if t.key in seen and not t.error:
            t.error = f"duplicate key {t.key!r} in the prompt table"
        seen.add(t.key)
    return tasks


def resolve_sources(tasks: list[ImageTask], base: str | None, images: dict | None = None,
                    images_spec: str | None = None) -> None:
    """Make every file a task names absolute (relative to ``base``, the prompt table's folder),
    and find image keys in the image webdataset's index (``formats.sources.index_images``). Done
    at plan time, so that KEY.json records where each file was read from."""
    from shardsmith.filters.conditioning import is_mask_strategy
    from shardsmith.pipelines.formats.sources import resolve

    for t in tasks:
        if t.image is not None:
            if images is not None and t.image in images:
                ref = images[t.image]
                if ref is None and not t.error:
                    t.error = f"image key {t.image!r} is in more than one shard of {images_spec}"
                t.image_ref = ref
            else:
                t.image = resolve(t.image, base)
        if t.mask is not None and not is_mask_strategy(t.mask):
            t.mask = resolve(t.mask, base)
        if t.control_image is not None:
            t.control_image = resolve(t.control_image, base)
        t.lora = [[resolve(p, base), s] for p, s in t.lora]
        t.textual_inversion = [[resolve(p, base), tok] for p, tok in t.textual_inversion]


def shard_tasks(tasks: list[ImageTask], shard_size: int) -> dict[str, list[ImageTask]]:
    return {f"{i // shard_size:05d}": tasks[i:i + shard_size] for i in range(0, len(tasks), shard_size)}


def captions_table(url: str, limit: int = 0, with_images: bool = False) -> pa.Table:
    """Prompts from a (curated) webdataset: one row per sample with a caption; keys link back
    (``with_images``: each row's ``image`` is its own sample, for img2img/inpaint/outpaint/ControlNet)."""
    from shardsmith.pipelines.formats.inputs import plan_shards
    from shardsmith.pipelines.formats.tar import iter_tar_samples

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
    t = pa.Table.from_pylist(rows, schema=pa.schema([("key", pa.string()), ("prompt", pa.string()),
                                                     ("source_key", pa.string()), ("source_shard", pa.string())]))
    return t.append_column("image", t.column("key")) if with_images else t
