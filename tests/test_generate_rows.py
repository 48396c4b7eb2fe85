"""Prompt-table rows beyond txt2img, without a model: columns, modes, per-row errors, masks,
outpainting canvases, control images, adapters' syntax, weight fingerprints and their cache."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from shardsmith.errors import ConfigError, InputError
from shardsmith.filters import conditioning as cond
from shardsmith.pipelines.config.generate import GenerateConfig
from shardsmith.pipelines.formats.prompts import (KNOWN_COLUMNS, Defaults, PromptError, check_columns, plan_tasks,
                                                  resolve_sources, split_suffix)


def table(rows):
    cols = sorted({k for r in rows for k in r})
    return pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows])


def tasks_of(rows, **defaults):
    return plan_tasks(table(rows), Defaults(**defaults))


def test_an_unknown_column_is_an_error_naming_it_and_the_known_ones():
    t = table([{"prompt": "x", "mode": "inpaint", "image": "a.png", "msk": "m.png", "strenght": 0.5}])
    with pytest.raises(PromptError) as e:
        check_columns(t, (), "p.jsonl")
    msg = str(e.value)
    assert "'msk', 'strenght'" in msg and "extra_columns" in msg
    assert all(c in msg for c in KNOWN_COLUMNS)
    check_columns(t, ("msk", "strenght"))  # pass-through metadata when named
    with pytest.raises(PromptError, match="mode.*is a column the job uses"):
        check_columns(t, ("mode",))
    with pytest.raises(PromptError, match="'nope'|nope not in"):
        check_columns(t, ("msk", "strenght", "nope"))


def test_extra_columns_are_copied_into_the_task():
    tasks = plan_tasks(table([{"prompt": "x", "license": "cc-by", "source_id": 7}]), Defaults(), ("license", "source_id"))
    assert tasks[0].extra == {"license": "cc-by", "source_id": 7}


def test_the_mode_follows_the_row_and_unused_values_are_errors():
    t = {x.key: x for x in tasks_of([
        {"key": "t2i", "prompt": "a"},
        {"key": "i2i", "prompt": "a", "image": "s.png"},
        {"key": "inp", "prompt": "a", "image": "s.png", "mask": "center"},
        {"key": "out", "prompt": "a", "image": "s.png", "pad": "8,0,8,0"},
        {"key": "i2i_mask", "prompt": "a", "mode": "img2img", "image": "s.png", "mask": "center"},
        {"key": "t2i_image", "prompt": "a", "mode": "txt2img", "image": "s.png"},
        {"key": "t2i_strength", "prompt": "a", "strength": 0.5},
        {"key": "inp_nomask", "prompt": "a", "mode": "inpaint", "image": "s.png"},
        {"key": "out_nopad", "prompt": "a", "mode": "outpaint", "image": "s.png"},
        {"key": "bad_mode", "prompt": "a", "mode": "upscale"},
        {"key": "mask_noimage", "prompt": "a", "mask": "center"},
        {"key": "cn_nocontrol", "prompt": "a", "controlnet": "cn"},
        {"key": "cn_detector_noimage", "prompt": "a", "controlnet": "cn", "control": "canny"},
        {"key": "cn_t2i_canny", "prompt": "a", "mode": "txt2img", "image": "s.png", "controlnet": "cn", "control": "canny"},
        {"key": "control_nocn", "prompt": "a", "control": "canny"},
        {"key": "ref_inpaint", "prompt": "a", "image": "s.png", "mask": "center", "refiner": "r"},
        {"key": "frac_noref", "prompt": "a", "high_noise_frac": 0.5},
        {"key": "bad_strength", "prompt": "a", "image": "s.png", "strength": 0},
        {"key": "one_side", "prompt": "a", "image": "s.png", "width": 64},
        {"key": "out_size", "prompt": "a", "image": "s.png", "pad": "64x64", "width": 64, "height": 64},
        {"key": "bad_border", "prompt": "a", "image": "s.png", "mask": "border:x"},
        {"key": "bad_pad", "prompt": "a", "image": "s.png", "pad": "left"},
        {"key": "bad_detector", "prompt": "a", "image": "s.png", "controlnet": "cn", "control": "hed"},
    ])}
    assert [t[k].mode for k in ("t2i", "i2i", "inp", "out")] == ["txt2img", "img2img", "inpaint", "outpaint"]
    assert all(t[k].error is None for k in ("t2i", "i2i", "inp", "out", "cn_t2i_canny"))
    assert t["i2i"].strength == 0.8 and t["inp"].strength == 1.0 and t["t2i"].strength is None  # diffusers' defaults
    assert t["i2i"].width is None and t["t2i"].width == 512  # image modes: the source's size
    expected = {
        "i2i_mask": "mode img2img does not use mask='center' (use mode inpaint)",
        "t2i_image": "mode txt2img does not use image='s.png'",
        "t2i_strength": "mode txt2img does not use strength=0.5",
        "inp_nomask": "mode inpaint needs a mask",
        "out_nopad": "mode outpaint needs pad",
        "bad_mode": "mode 'upscale': one of txt2img, img2img, inpaint, outpaint",
        "mask_noimage": "mask='center' needs an image to inpaint",
        "cn_nocontrol": "controlnet needs control_image",
        "cn_detector_noimage": "control 'canny' is applied to the source image, and the row has none",
        "control_nocn": "control is given without a controlnet",
        "ref_inpaint": "refiner: supported with txt2img and img2img, not inpaint",
        "frac_noref": "high_noise_frac is given without a refiner",
        "bad_strength": "is outside (0.0, 1.0]",
        "one_side": "width without height",
        "out_size": "mode outpaint takes its canvas size from pad",
        "bad_border": "mask 'border:x': expected border:PX",
        "bad_pad": "pad 'left': expected left,top,right,bottom",
        "bad_detector": "control 'hed': known detectors: canny",
    }
    for k, msg in expected.items():
        assert t[k].error and msg in t[k].error, (k, t[k].error)


def test_run_defaults_apply_only_where_a_mode_uses_them():
    t = tasks_of([{"prompt": "a"}, {"prompt": "a", "image": "s.png"}], mask="center", strength=0.6)
    assert t[0].mode == "txt2img" and t[0].error is None and t[0].mask is None and t[0].strength is None
    assert t[1].mode == "inpaint" and t[1].mask == "center" and t[1].strength == 0.6


def test_adapter_lists_and_their_suffixes():
    assert split_suffix("s3://b/x.safetensors") == ("s3://b/x.safetensors", None)
    assert split_suffix("s3://b/x.safetensors:0.8") == ("s3://b/x.safetensors", "0.8")
    assert split_suffix("/m/cat.bin:<cat>") == ("/m/cat.bin", "<cat>")
    t = tasks_of([{"prompt": "a", "lora": "a.safetensors:0.5; /abs/b.safetensors", "textual_inversion": "c.bin:<c>"},
                  {"prompt": "a", "lora": "x.safetensors:-1.5"},
                  {"prompt": "a", "lora": "a.safetensors:big"},
                  {"prompt": "a", "lora": "a.safetensors:11"},
                  {"prompt": "a", "lora": "a.safetensors;a.safetensors:0.3"}])
    assert t[0].lora == [["a.safetensors", 0.5], ["/abs/b.safetensors", 1.0]]
    assert t[0].textual_inversion == [["c.bin", "<c>"]]
    assert t[1].lora == [["x.safetensors", -1.5]]
    listed = tasks_of([{"prompt": "a", "lora": ["x.safetensors:0.25", "y.safetensors"]}])  # a list column
    assert listed[0].lora == [["x.safetensors", 0.25], ["y.safetensors", 1.0]]
    assert "not a number" in t[2].error and "outside -10..10" in t[3].error and "listed twice" in t[4].error
    resolve_sources(t, "/tables")
    assert t[0].lora == [["/tables/a.safetensors", 0.5], ["/abs/b.safetensors", 1.0]]
    assert t[0].textual_inversion == [["/tables/c.bin", "<c>"]]
    assert t[0].adapters() != t[1].adapters() and t[0].group() != t[1].group()


def test_relative_files_are_relative_to_the_table_and_image_keys_come_from_the_webdataset(sample):
    from shardsmith.pipelines.formats.sources import index_images, read_source
    from shardsmith.pipelines.formats.tar import iter_tar_samples

    first = next(s for s in iter_tar_samples(sample["shards"][0]) if s.error_kind is None)
    t = tasks_of([{"prompt": "a", "image": first.key, "mask": "m.png"}, {"prompt": "a", "image": "sub/s.png"},
                  {"prompt": "a", "image": "s3://bucket/s.png", "mask": "random-box"}])
    index = index_images(sample["shards"][0])
    resolve_sources(t, "/tables", index, sample["shards"][0])
    assert t[0].image_ref["url"] == sample["shards"][0] and t[0].mask == "/tables/m.png"
    assert read_source(t[0].image, t[0].image_ref) == first.image  # the byte range of its member
    assert t[1].image == "/tables/sub/s.png" and t[1].image_ref is None
    assert t[2].image == "s3://bucket/s.png" and t[2].mask == "random-box"


def test_masks_canvases_and_control_images():
    m = cond.strategy_mask("center", (64, 32), 1, "k")
    a = np.asarray(m)
    assert a.shape == (32, 64) and a[8:24, 16:48].min() == 255 and a.sum() == 255 * 16 * 32
    b = np.asarray(cond.strategy_mask("border:4", (32, 32), 1, "k"))
    assert b[4:28, 4:28].max() == 0 and b[:4].min() == 255 and b.sum() == 255 * (32 * 32 - 24 * 24)
    r1, r2 = (np.asarray(cond.strategy_mask("random-box", (64, 64), s, "k")) for s in (1, 1))
    assert np.array_equal(r1, r2) and r1.any()  # the same row: the same box
    assert not np.array_equal(r1, np.asarray(cond.strategy_mask("random-box", (64, 64), 2, "k")))
    with pytest.raises(cond.ConditioningError, match="border must be"):
        cond.strategy_mask("border:40", (64, 64), 1, "k")

    src = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    canvas, mask = cond.outpaint_canvas(src, "8,8,8,16")
    assert canvas.size == (64, 64) and mask.size == (64, 64)
    c, mk = np.asarray(canvas), np.asarray(mask)
    assert np.array_equal(c[8:48, 8:56], np.asarray(src)) and mk[8:48, 8:56].max() == 0 and mk[:8].min() == 255
    assert np.array_equal(c[0, 8:56], np.asarray(src)[0])  # edge pixels repeated outwards
    canvas, _ = cond.outpaint_canvas(src, "64x64")
    assert np.array_equal(np.asarray(canvas)[12:52, 8:56], np.asarray(src))  # centred
    with pytest.raises(cond.ConditioningError, match="not a multiple of 8"):
        cond.outpaint_canvas(src, "1,0,0,0")
    with pytest.raises(cond.ConditioningError, match="smaller than the image"):
        cond.outpaint_canvas(src, "32x32")

    import cv2

    edges = np.asarray(cond.control_image("canny", src))
    assert edges.shape == (40, 48, 3) and np.array_equal(edges[..., 0], cv2.Canny(np.asarray(src), 100, 200))
    assert np.array_equal(np.asarray(cond.control_image("canny:10,50", src))[..., 2], cv2.Canny(np.asarray(src), 10, 50))


def test_the_model_fingerprint_covers_the_weights_and_hashes_are_cached(tmp_path, monkeypatch):
    from shardsmith.filters import diffusion

    monkeypatch.setenv("SHARDSMITH_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "unet" / "config.json").write_text('{"a": 1}')
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1000)
    before = diffusion.model_fingerprint(str(model))
    comps = diffusion.component_digests(str(model))
    assert set(comps) == {"_root", "unet"}
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\1" + b"\0" * 999)  # same size, same configs
    assert diffusion.model_fingerprint(str(model)) != before
    # computed once per node: another process (no in-process memo) reads the digest from the cache
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    (cache_file,) = [f for f in (tmp_path / "cache" / "sha256").iterdir()
                     if os.path.basename(str(weights)) in json.loads(f.read_text())]
    entries = json.loads(cache_file.read_text())
    entries[weights.name][3] = "f" * 64  # what a second hashing would not give
    cache_file.write_text(json.dumps(entries))
    diffusion._SHA_MEMO.clear()
    assert diffusion.file_sha256(str(weights)) == "f" * 64
    weights.write_bytes(b"\2" + b"\0" * 999)  # a changed file (new mtime) is hashed again
    os.utime(weights, ns=(1, 1))
    import hashlib

    assert diffusion.file_sha256(str(weights)) == hashlib.sha256(b"\2" + b"\0" * 999).hexdigest()


def test_config_errors_before_any_work():
    for kw, msg in [({"mode": "upscale"}, "mode"), ({"lora": ("a:x",)}, "lora"), ({"pad": "big"}, "pad"),
                    ({"control": "hed", "controlnet": "c"}, "control"), ({"mask": "border:"}, "border"),
                    ({"high_noise_frac": 1.0}, "high_noise_frac"), ({"control": "canny"}, "without a controlnet")]:
        with pytest.raises(ConfigError, match=msg):
            GenerateConfig(output="o", model="m", defaults=Defaults(**kw)).validate("generate")
    with pytest.raises(ConfigError, match="safety_checker"):
        GenerateConfig(output="o", model="m", safety_checker="maybe").validate("generate")
    with pytest.raises(ConfigError, match="batch_forward"):
        GenerateConfig(output="o", model="m", batch_forward=True, batch_size=1).validate("generate")
    with pytest.raises(ConfigError, match="--control"):
        GenerateConfig(output="o", model="m", defaults=Defaults(controlnet="c")).validate("augment")


def test_settings_added_later_keep_the_fingerprint_of_earlier_runs():
    old_keys = {"model", "revision", "scheduler", "dtype", "watermark", "prompts", "from_captions", "input", "limit",
                "shard_size", "strength", "variants", "prompt_template", "caption_dropout", "size", "max_side",
                "buckets", "bucket_area", "defaults", "tool"}
    fp = GenerateConfig(output="o", model="m").fingerprint("generate")
    assert set(fp) == old_keys and set(fp["defaults"]) == {"negative_prompt", "num_inference_steps", "guidance_scale",
                                                           "width", "height", "num_images", "seed"}
    fp2 = GenerateConfig(output="o", model="m", batch_forward=True, defaults=Defaults(mode="inpaint")).fingerprint("generate")
    assert fp2["batch_forward"] is True and fp2["batch_size"] == 4 and fp2["defaults"]["mode"] == "inpaint"


def test_cli_unknown_column_exits_2_before_any_work(tiny_models, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "mode": "inpaint", "image": "x.png", "maks": "m.png"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "shardsmith", "generate", str(prompts), str(tmp_path / "out"), "--model",
                        tiny_models["sd_model"]], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "unknown column 'maks'" in r.stderr and "known columns are key, prompt" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_inputs_that_cannot_be_read_are_input_errors(tmp_path):
    from shardsmith.pipelines.formats.sources import SourceError, index_images, read_file

    with pytest.raises(SourceError, match="file not found"):
        read_file(str(tmp_path / "nope.png"), "source image")
    (tmp_path / "broken.tar").write_bytes(b"x" * 700)
    with pytest.raises(InputError):
        index_images(str(tmp_path / "broken.tar"))


def test_regenerate_cli_errors_are_one_line_exit_2(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"prompt": "a", "seed": 1}))
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    for args, msg in [([str(tmp_path / "none.tar"), "k"], "no such shard"),
                      ([str(tmp_path / "old.json")], "has no 'task'"),
                      ([str(tmp_path / "none.tar")], "give SHARD KEY, or a KEY.json file")]:
        r = subprocess.run([sys.executable, "-m", "shardsmith", "regenerate", *args], capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-1500:])
