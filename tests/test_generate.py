"""generate and augment on a real local Ray with a tiny Stable Diffusion pipeline."""

import hashlib
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import curate_config, read_scores
from PIL import Image

from shardsmith.filters.augment import buckets_for_area
from shardsmith.pipelines.config.generate import GenerateConfig
from shardsmith.pipelines.flows.augment import run_augment
from shardsmith.pipelines.flows.curate import run_curate
from shardsmith.pipelines.flows.generate import run_generate
from shardsmith.pipelines.formats.prompts import Defaults

QUIET = dict(log=lambda *a: None)

PROMPTS = [
    {"prompt": "a red bicycle", "seed": 7, "width": 64, "height": 64},
    {"prompt": "a mountain lake", "seed": 123456789, "negative_prompt": "blurry", "guidance_scale": 3.0,
     "width": 96, "height": 64},
    {"prompt": "a lighthouse", "num_images": 2, "width": 64, "height": 64},  # derived seeds
    {"prompt": "", "seed": 1},  # no prompt
    {"prompt": "bad size", "width": 100, "height": 64},  # not divisible by 8
    {"prompt": "bad steps", "num_inference_steps": -2},
    {"prompt": "absurd steps", "num_inference_steps": 100000},
    {"prompt": "a big one", "seed": 3, "width": 256, "height": 256},
]


def write_prompts(path):
    """jsonl: pyarrow infers each column over all rows (from_pylist would look at the first only)."""
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


def members(tar_path):
    with tarfile.open(tar_path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def all_members(out):
    got = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".tar"):
            got.update(members(os.path.join(out, f)))
    return got


# The run's defaults, as the flags --steps --guidance --width --height --seed would give them.
RUN = {"num_inference_steps": 2, "guidance_scale": 7.5, "width": 64, "height": 64, "seed": 11}
ERROR_ROWS = {3, 4, 5, 6}


def gen_config(prompts, out, models, **kw):
    base = dict(output=str(out), model=models["sd_model"], prompts=prompts, shard_size=3, batch_size=2,
                defaults=Defaults(**RUN), progress=False,
                dtype="float32")  # the references are float32 diffusers calls
    base.update(kw)
    return GenerateConfig(**base)


@pytest.fixture(scope="module")
def generated(ray_local, tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    prompts = write_prompts(d / "prompts.jsonl")
    stats = run_generate(gen_config(prompts, d / "out", tiny_models, watermark=False), **QUIET)
    return d, prompts, stats


def test_every_row_is_an_image_or_an_error_row(generated):
    d, _, stats = generated
    index = pa.concat_tables([pq.read_table(d / "out" / f) for f in sorted(os.listdir(d / "out"))
                              if f.endswith(".parquet")]).to_pylist()
    assert stats["rows_read"] == len(index) == 9  # 8 rows, one asking for 2 images
    by_key = {r["key"]: r for r in index}
    errors = {k: r["error_message"] for k, r in by_key.items() if r["status"] == "error"}
    assert "no prompt" in errors["00000003"]
    assert "width=100 is not divisible by 8" in errors["00000004"]
    assert "num_inference_steps=-2 is outside 1..1000" in errors["00000005"]
    assert "num_inference_steps=100000" in errors["00000006"]
    assert stats["errors"] == 4 and stats["kept"] == 5
    got = all_members(d / "out")
    assert sorted(k for k in got if k.endswith(".png")) == sorted(f"{k}.png" for k, r in by_key.items()
                                                                   if r["status"] == "success")


def documented_seed(run_seed: int, key: str) -> int:
    """README: a row without a seed gets sha256(run seed, key): the first 8 bytes of
    sha256("shardsmith:{run seed}:{key}"), big-endian, modulo 2**63."""
    return int.from_bytes(hashlib.sha256(f"shardsmith:{run_seed}:{key}".encode()).digest()[:8], "big") % 2**63


def expected_images(prompts=PROMPTS, run=RUN):
    """key -> the parameters of each image, from the input table and the run's defaults alone."""
    out = {}
    for i, row in enumerate(prompts):
        if i in ERROR_ROWS:
            continue
        n = row.get("num_images", 1)
        for j in range(n):
            key = f"{i:08d}" if n == 1 else f"{i:08d}_{j}"
            out[key] = {"prompt": row["prompt"], "negative_prompt": row.get("negative_prompt", ""),
                        "seed": row["seed"] + j if "seed" in row else documented_seed(run["seed"], key),
                        **{k: row.get(k, run[k]) for k in ("num_inference_steps", "guidance_scale", "width", "height")}}
    return out


def test_images_equal_a_direct_diffusers_call(generated, tiny_models):
    """The issue's check: same components, prompt, seed, parameters -> the same pixels. The
    parameters come from the prompt table (and the run's defaults), never from the output."""
    from diffusers import StableDiffusionPipeline

    d, _, _ = generated
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd_model"])
    pipe.set_progress_bar_config(disable=True)
    got = all_members(d / "out")
    expected = expected_images()
    assert sorted(k[:-4] for k in got if k.endswith(".png")) == sorted(expected)
    for key, p in expected.items():
        ref = pipe(p["prompt"], negative_prompt=p["negative_prompt"] or None, num_inference_steps=p["num_inference_steps"],
                   guidance_scale=p["guidance_scale"], width=p["width"], height=p["height"],
                   generator=torch.Generator("cpu").manual_seed(p["seed"])).images[0]
        ours = Image.open(io.BytesIO(got[f"{key}.png"]))
        assert np.array_equal(np.asarray(ours), np.asarray(ref)), key
        recorded = json.loads(got[f"{key}.json"])
        assert {k: recorded[k] for k in p} == p, key  # the json records what was asked
        assert got[f"{key}.txt"] == p["prompt"].encode()
    assert len(expected) == 5
    assert {"model", "model_fingerprint", "scheduler", "shardsmith_version"} <= set(json.loads(got["00000001.json"]))
    assert expected["00000002_0"]["seed"] != expected["00000002_1"]["seed"]


def test_scheduler_option_gives_that_schedulers_images(ray_local, tiny_models, tmp_path):
    """--scheduler euler: the pixels of a direct call with EulerDiscreteScheduler.from_config."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": "a red bicycle", "seed": 7}, {"prompt": "a quiet harbour", "seed": 8}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_generate(gen_config(str(prompts), tmp_path / "out", tiny_models, watermark=False, scheduler="euler"), **QUIET)
    got = all_members(tmp_path / "out")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd_model"])
    default_scheduler = type(pipe.scheduler).__name__
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for i, row in enumerate(rows):
        key = f"{i:08d}"
        ref = pipe(row["prompt"], num_inference_steps=RUN["num_inference_steps"], guidance_scale=RUN["guidance_scale"],
                   width=RUN["width"], height=RUN["height"],
                   generator=torch.Generator("cpu").manual_seed(row["seed"])).images[0]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(got[f"{key}.png"]))), np.asarray(ref)), key
        assert json.loads(got[f"{key}.json"])["scheduler"] == "EulerDiscreteScheduler" != default_scheduler


def test_bfloat16_images_equal_a_direct_bfloat16_call_whatever_the_batch(ray_local, tiny_models, tmp_path):
    """At a fixed dtype (here bfloat16, what ``--dtype auto`` picks on a CPU with bf16 units) the
    per-seed promise holds bit for bit: the direct call's pixels, at any --batch-size."""
    from diffusers import StableDiffusionPipeline

    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": "a red bicycle", "seed": 7}, {"prompt": "a quiet harbour", "seed": 8},
            {"prompt": "a lone tree", "seed": 9}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for batch in (1, 3):
        run_generate(gen_config(str(prompts), tmp_path / f"out{batch}", tiny_models, watermark=False,
                                dtype="bfloat16", batch_size=batch), **QUIET)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd_model"], dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    fp32 = StableDiffusionPipeline.from_pretrained(tiny_models["sd_model"])
    fp32.set_progress_bar_config(disable=True)
    for batch in (1, 3):
        got = all_members(tmp_path / f"out{batch}")
        for i, row in enumerate(rows):
            key = f"{i:08d}"
            args = dict(num_inference_steps=RUN["num_inference_steps"], guidance_scale=RUN["guidance_scale"],
                        width=RUN["width"], height=RUN["height"])
            ref = pipe(row["prompt"], generator=torch.Generator("cpu").manual_seed(row["seed"]), **args).images[0]
            ours = np.asarray(Image.open(io.BytesIO(got[f"{key}.png"])))
            assert np.array_equal(ours, np.asarray(ref)), (batch, key)
            assert json.loads(got[f"{key}.json"])["dtype"] == "bfloat16"
            if batch == 1 and i == 0:  # and bf16 really ran: float32 makes other pixels
                other = fp32(row["prompt"], generator=torch.Generator("cpu").manual_seed(row["seed"]), **args).images[0]
                assert not np.array_equal(ours, np.asarray(other))


def test_compiled_unet_is_recorded_and_regenerate_compiles_too(ray_local, tiny_models, tmp_path, capsys):
    """--compile: the actors run the UNet torch.compile'd, KEY.json says so, the image stays within
    a pixel level or two of the eager call's, and regenerate (which compiles, as the record says)
    makes it again bit for bit."""
    from diffusers import StableDiffusionPipeline
    from torch._dynamo.utils import counters

    from shardsmith.jobs.regenerate import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red bicycle", "seed": 7}) + "\n")
    out = tmp_path / "out"
    run_generate(gen_config(str(prompts), out, tiny_models, watermark=False, compile=True, batch_size=1), **QUIET)
    got = all_members(out)
    record = json.loads(got["00000000.json"])
    assert record["unet_compiled"] is True and record["dtype"] == "float32"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd_model"])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red bicycle", generator=torch.Generator("cpu").manual_seed(7),
               num_inference_steps=RUN["num_inference_steps"], guidance_scale=RUN["guidance_scale"],
               width=RUN["width"], height=RUN["height"]).images[0]
    ours = np.asarray(Image.open(io.BytesIO(got["00000000.png"])), dtype=np.int16)
    assert np.abs(ours - np.asarray(ref, dtype=np.int16)).max() <= 4
    frames = counters["frames"]["ok"]
    assert main([str(out / "00000.tar"), "00000000"]) == 0, capsys.readouterr()
    assert "00000000: bit-identical" in capsys.readouterr().out
    assert counters["frames"]["ok"] > frames  # regenerate compiled the UNet (this process's dynamo counters)


def test_from_captions_uses_the_shards_captions_as_prompts(ray_local, tiny_models, sample, tmp_path):
    """--from-captions SHARDS: one image per sample with a caption, the caption as its prompt, keys
    linking back to the source sample."""
    order, captions = [], {}
    with tarfile.open(sample["shards"][0]) as t:
        for m in t.getmembers():
            key = m.name.split(".", 1)[0]
            if key not in captions:
                order.append(key)
                captions[key] = ""
            if m.name.endswith(".txt"):
                captions[key] = t.extractfile(m).read().decode("utf-8", "replace")
    cfg = gen_config(None, tmp_path / "out", tiny_models, watermark=False, from_captions=sample["shards"][0],
                     limit=4, shard_size=4)
    stats = run_generate(cfg, **QUIET)
    got = all_members(tmp_path / "out")
    metas = {k[:-5]: json.loads(v) for k, v in got.items() if k.endswith(".json")}
    first = {k: captions[k] for k in order[:4]}
    assert all(first.values()), first
    assert stats["rows_read"] == 4 and sorted(metas) == sorted(first)
    for key, caption in first.items():
        assert metas[key]["prompt"] == caption and got[f"{key}.txt"] == caption.encode()
        assert metas[key]["seed"] == documented_seed(RUN["seed"], key)


def test_same_images_whatever_batch_size_and_workers(generated, tiny_models, tmp_path):
    d, prompts, _ = generated
    run_generate(gen_config(prompts, tmp_path / "o", tiny_models, watermark=False, batch_size=5, num_actors=2,
                            actor_cpus=0.5, shard_size=4), **QUIET)
    a, b = all_members(d / "out"), all_members(tmp_path / "o")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k


def test_resume_after_a_partial_run(generated, tiny_models, tmp_path):
    """Shard 00001 as a killed run leaves it: no ledger entry, its tar cut short, its parquet index
    garbage. The rerun redoes exactly it; the committed shards are not touched."""
    d, prompts, _ = generated
    out = tmp_path / "out"
    shutil.copytree(d / "out", out)
    assert sorted(f for f in os.listdir(out) if f.startswith("00001")) == ["00001.parquet", "00001.tar"]
    os.remove(out / "_ledger" / "00001.json")
    (out / "00001.tar").write_bytes((d / "out" / "00001.tar").read_bytes()[:700])
    (out / "00001.parquet").write_bytes(b"PAR1 garbage")
    untouched = {f: os.stat(out / f).st_mtime_ns for f in ("00000.tar", "00000.parquet", "00002.tar", "00002.parquet",
                                                             "_ledger/00000.json", "_ledger/00002.json")}
    logs = []
    run_generate(gen_config(prompts, out, tiny_models, watermark=False), log=logs.append)
    assert "2 already committed, 1 to do" in logs[0]
    assert {f: os.stat(out / f).st_mtime_ns for f in untouched} == untouched
    for f in ("00000.tar", "00001.tar", "00002.tar", "00000.parquet", "00001.parquet", "00002.parquet"):
        assert (out / f).read_bytes() == (d / "out" / f).read_bytes(), f


def test_watermark_decodes_and_curate_reads_generated_shards_back(ray_local, tiny_models, tmp_path, generated):
    from shardsmith.filters.watermark import detect

    prompts = write_prompts(tmp_path / "p.jsonl")
    run_generate(gen_config(prompts, tmp_path / "wm", tiny_models), **QUIET)
    marked = np.asarray(Image.open(io.BytesIO(all_members(tmp_path / "wm")["00000007.png"])).convert("RGB"))
    clean = np.asarray(Image.open(io.BytesIO(all_members(generated[0] / "out")["00000007.png"])).convert("RGB"))
    assert detect(marked) and not detect(clean)
    stats = run_curate(curate_config(tmp_path / "wm", tmp_path / "curated", tiny_models, preset=None,
                                     detect_generated=True, report=False), **QUIET)
    rows = {r["key"]: r for r in read_scores(tmp_path / "curated").to_pylist()}
    # every prompt row is accounted for: the 5 images made, and the 4 error rows of the index parquet
    assert stats["rows_read"] == 9 and stats["errors"] == 4
    assert rows["00000007"]["generated"] is True  # 256 px: carries the watermark
    assert rows["00000000"]["generated"] is False  # 64 px: too small to carry it
    assert rows["00000001"]["caption"] == "a mountain lake"


def test_augment_variants_dropout_buckets_and_bad_sources(ray_local, tiny_models, sample, tmp_path):
    cfg = GenerateConfig(output=str(tmp_path / "aug"), model=tiny_models["sd_model"], input=sample["shards"][0],
                         variants=2, strength=0.5, caption_dropout=0.5, buckets=True, bucket_area=64 * 64, dtype="float32",
                         defaults=Defaults(num_inference_steps=2, seed=5), batch_size=4, progress=False)
    stats = run_augment(cfg, **QUIET)
    index = pq.read_table(tmp_path / "aug" / "00000.parquet").to_pylist()
    assert stats["rows_read"] == len(index) == 2 * 20
    errors = [r for r in index if r["status"] == "error"]
    assert len(errors) == 2 * 3  # the sample shard's 2 broken images and 1 sample without image, x2 variants
    got = members(tmp_path / "aug" / "00000.tar")
    metas = [json.loads(v) for k, v in got.items() if k.endswith(".json")]
    assert metas and all(m["source_key"] and m["key"] == f"{m['source_key']}_v{m['variant']}" for m in metas)
    sizes = {(m["width"], m["height"]) for m in metas}
    assert sizes <= set(buckets_for_area(64 * 64))
    for m in metas:
        img = Image.open(io.BytesIO(got[m["key"] + ".png"]))
        assert img.size == (m["width"], m["height"])
        assert (got[m["key"] + ".txt"] == b"") == m["caption_dropped"]
    dropped = sum(m["caption_dropped"] for m in metas)
    assert 0 < dropped < len(metas)
    again = run_augment(GenerateConfig(**{**cfg.__dict__, "output": str(tmp_path / "aug2")}), **QUIET)
    assert (tmp_path / "aug" / "00000.tar").read_bytes() == (tmp_path / "aug2" / "00000.tar").read_bytes()
    assert again["kept"] == stats["kept"]


def test_explicit_seed_with_several_images_counts_up():
    from shardsmith.pipelines.formats.prompts import plan_tasks

    tasks = plan_tasks(pa.Table.from_pylist([{"prompt": "x", "seed": 40, "num_images": 3}]), Defaults())
    assert [t.seed for t in tasks] == [40, 41, 42] and [t.key for t in tasks] == ["00000000_0", "00000000_1",
                                                                                   "00000000_2"]
