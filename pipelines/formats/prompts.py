"""Prompt tables -> the list of images to make, each with every parameter fixed.

A prompt table is parquet, jsonl or csv (any fsspec URL) with ``prompt`` (required) and optional
per-row ``key``, ``negative_prompt``, ``seed``, ``num_inference_steps``, ``guidance_scale``,
``width``, ``height``, ``num_images``; the CLI gives the defaults. A row asking for N images
yields N samples ``KEY_0 .. KEY_{N-1}`` with seeds ``s, s+1, ...`` (each reproducible alone with
a direct diffusers call and that seed). A row without a seed gets one derived from the run seed
and its key, so it never depends on batching, workers or resumes.

Bad rows are not dropped: they become samples with an error message (no prompt, a step count
that is not a whole number in 1..1000, a size not divisible by 8, ...).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass

import pyarrow as pa

from shardsmith.errors import InputError
from shardsmith.pipelines.core import fs as fsutil

PROMPT_COLUMNS = ("key", "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "width",
                  "height", "num_images")
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

    def params(self) -> tuple:
        """The parameter set that must be identical for images to share a batch."""
        return (self.num_inference_steps, self.guidance_scale, self.width, self.height)

    def to_dict(self) -> dict:
        return asdict(self)


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


def task_from_row(row: dict, index_in_table: int, d: Defaults) -> list[ImageTask]:
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
    base_seed = seed
    tasks = []
    for j in range(n):
        k = key if n == 1 else f"{key}_{j}"
        s = (base_seed + j) if base_seed is not None else derive_seed(d.seed, k)
        tasks.append(ImageTask(k, index_in_table, j, prompt, neg, s, steps, g, sizes["width"], sizes["height"],
                               "; ".join(errors) or None, row.get("source_key"), row.get("source_shard")))
    return tasks


def plan_tasks(table: pa.Table, d: Defaults) -> list[ImageTask]:
    tasks: list[ImageTask] = []
    for i, row in enumerate(table.to_pylist()):
        tasks.extend(task_from_row(row, i, d))
    seen: set[str] = set()
    for t in tasks:
        if t.key in seen and not t.error:
            t.error = f"duplicate key {t.key!r} in the prompt table"
        seen.add(t.key)
    return tasks


def shard_tasks(tasks: list[ImageTask], shard_size: int) -> dict[str, list[ImageTask]]:
    return {f"{i // shard_size:05d}": tasks[i:i + shard_size] for i in range(0, len(tasks), shard_size)}


def captions_table(url: str, limit: int = 0) -> pa.Table:
    """Prompts from a (curated) webdataset: one row per sample with a caption; keys link back."""
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
    return pa.Table.from_pylist(rows, schema=pa.schema([("key", pa.string()), ("prompt", pa.string()),
                                                        ("source_key", pa.string()), ("source_shard", pa.string())]))
