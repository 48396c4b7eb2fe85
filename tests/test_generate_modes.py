"""Every mode and adapter of generate/augment on a real local Ray, each image compared with a
direct diffusers call given the same inputs, seed and batch shape (tiny pipelines built offline:
jobs/tiny_generation.py), bad rows as error rows, resume, regenerate from KEY.json."""

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
from PIL import Image

from shardsmith.pipelines.config.generate import GenerateConfig
from shardsmith.pipelines.flows.generate import run_generate
from shardsmith.pipelines.formats.prompts import Defaults

QUIET = dict(log=lambda *a: None)
STEPS = 2


def g(seed):
    return torch.Generator("cpu").manual_seed(seed)


def members(out):
    got = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".tar"):
            with tarfile.open(os.path.join(out, f)) as t:
                got.update({m.name: t.extractfile(m).read() for m in t.getmembers()})
    return got


def index(out):
    return {r["key"]: r for r in pa.concat_tables([pq.read_table(os.path.join(out, f)) for f in sorted(os.listdir(out))
                                                   if f.endswith(".parquet")]).to_pylist()}


def pixels(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class Refs:
    """Direct diffusers pipelines, loaded fresh (never the job's objects), one per configuration."""

    def __init__(self):
        self.cache = {}

    def get(self, cls_name, model, controlnet=None, loras=(), tis=(), **kw):
        key = (cls_name, model, controlnet, tuple(loras), tuple(tis), tuple((k, id(v)) for k, v in sorted(kw.items())))
        if key not in self.cache:
            import diffusers

            extra = {"controlnet": diffusers.ControlNetModel.from_pretrained(controlnet)} if controlnet else {}
            pipe = getattr(diffusers, cls_name).from_pretrained(model, **extra, **kw)
            pipe.set_progress_bar_config(disable=True)
            for i, (path, scale) in enumerate(loras):
                pipe.load_lora_weights(path, adapter_name=f"ref{i}")
            if loras:
                pipe.set_adapters([f"ref{i}" for i in range(len(loras))], [s for _, s in loras])
            for path in tis:
                pipe.load_textual_inversion(path)
            if getattr(pipe, "watermark", None) is not None:
                pipe.watermark = None
            self.cache[key] = pipe
        return self.cache[key]


@pytest.fixture(scope="module")
def refs():
    return Refs()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    yy, xx = np.mgrid[0:64, 0:64]
    src = np.stack([(xx * 4) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], axis=2).astype(np.uint8)
    src[20:44, 20:44] = [250, 30, 30]  # a square: edges for canny
    Image.fromarray(src).save(d / "src.png")
    Image.fromarray(src[:40, :48]).save(d / "small.png")
    m = np.zeros((64, 64), np.uint8)
    m[8:40, 16:56] = 255
    Image.fromarray(m).save(d / "mask.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(d / "badmask.png")
    ctl = np.zeros((64, 64, 3), np.uint8)
    ctl[:, 30:34] = 255
    Image.fromarray(ctl).save(d / "control.png")
    return d


def main_rows(gm, wds_key):
    cn, style, subject = gm["controlnet"], gm["lora"], gm["lora_2"]
    rows = [
        {"key": "t2i", "prompt": "a cat", "seed": 1},
        {"key": "i2i", "prompt": "a cat", "seed": 2, "image": "src.png", "strength": 0.6},
        {"key": "i2i_wds", "prompt": "a cat", "seed": 3, "image": wds_key, "width": 64, "height": 64},
        {"key": "inp_file", "prompt": "a dog", "seed": 4, "image": "src.png", "mask": "mask.png"},
        {"key": "inp_box", "prompt": "a dog", "seed": 5, "image": "src.png", "mask": "random-box"},
        {"key": "inp_border", "prompt": "a dog", "seed": 6, "image": "src.png", "mask": "border:8", "strength": 0.9},
        {"key": "out_sides", "prompt": "a field", "seed": 7, "image": "small.png", "pad": "8,8,8,16"},
        {"key": "out_size", "prompt": "a field", "seed": 8, "mode": "outpaint", "image": "small.png", "pad": "64x64"},
        {"key": "cn_t2i", "prompt": "a box", "seed": 9, "mode": "txt2img", "image": "src.png", "controlnet": cn,
         "control": "canny", "control_scale": 0.5},
        {"key": "cn_i2i", "prompt": "a box", "seed": 10, "image": "src.png", "controlnet": cn,
         "control_image": "control.png"},
        {"key": "cn_inp", "prompt": "a box", "seed": 11, "image": "src.png", "mask": "center", "controlnet": cn,
         "control": "canny"},
        {"key": "lora", "prompt": "a cat", "seed": 12, "lora": f"{style}:0.7"},
        {"key": "lora2", "prompt": "a cat", "seed": 13, "lora": f"{style}:0.7;{subject}"},
        {"key": "lora_inp", "prompt": "a dog", "seed": 14, "image": "src.png", "mask": "center", "lora": subject},
        {"key": "ti", "prompt": "a <tinycat> on a sofa", "seed": 15, "textual_inversion": gm["textual_inversion"]},
        {"key": "ti_lora", "prompt": "a <tinycat>", "seed": 16, "textual_inversion": gm["textual_inversion"],
         "lora": style},
        {"key": "plain_after", "prompt": "a cat", "seed": 1},  # the t2i row again, after every adapter
        {"key": "bad_src", "prompt": "a cat", "seed": 17, "mode": "img2img", "image": "nope.png"},
        {"key": "bad_mask", "prompt": "a cat", "seed": 18, "image": "src.png", "mask": "badmask.png"},
        {"key": "bad_lora", "prompt": "a cat", "seed": 19, "lora": gm["lora_other_model"]},
        {"key": "bad_ti", "prompt": "a <wide>", "seed": 20, "textual_inversion": gm["textual_inversion_wrong_dim"]},
        {"key": "ref_on_sd", "prompt": "a cat", "seed": 21, "refiner": gm["sdxl_refiner"]},
        {"key": "plain_last", "prompt": "a lake", "seed": 22},
    ]
    return [{**r, "license": f"cc-{i}"} for i, r in enumerate(rows)]


def gen_cfg(prompts, out, model, **kw):
    base = dict(output=str(out), model=model, prompts=prompts, shard_size=8, batch_size=8, num_actors=1,
                watermark=False, progress=False, defaults=Defaults(num_inference_steps=STEPS, width=64, height=64, seed=3),
                dtype="float32")  # the references are float32 diffusers calls
    base.update(kw)
    return GenerateConfig(**base)


@pytest.fixture(scope="module")
def modes_run(ray_local, generation_models, sample, data, tmp_path_factory):
    from shardsmith.pipelines.formats.tar import iter_tar_samples

    src = next(s for s in iter_tar_samples(sample["shards"][0]) if s.error_kind is None)
    rows = main_rows(generation_models, src.key)
    prompts = write_jsonl(data / "prompts.jsonl", rows)
    out = tmp_path_factory.mktemp("modes") / "out"
    cfg = gen_cfg(prompts, out, generation_models["sd_model"], images=sample["shards"][0], extra_columns=("license",))
    stats = run_generate(cfg, **QUIET)
    return {"out": out, "stats": stats, "cfg": cfg, "src": src, "rows": {r["key"]: r for r in rows}}


def test_bad_rows_are_error_rows_and_the_rest_is_made(modes_run):
    idx, stats = index(modes_run["out"]), modes_run["stats"]
    assert stats["rows_read"] == len(idx) == 23
    err = {k: r["error_message"] for k, r in idx.items() if r["status"] == "error"}
    assert set(err) == {"bad_src", "bad_mask", "bad_lora", "bad_ti", "ref_on_sd"}
    assert "nope.png': file not found" in err["bad_src"]
    assert "badmask.png' is 32x32, the source image 64x64" in err["bad_mask"]
    assert "sdxl-unet.safetensors' does not fit" in err["bad_lora"] and "size mismatch" in err["bad_lora"]
    assert "wide.safetensors' does not fit" in err["bad_ti"]
    assert "refiner: needs an SDXL base model" in err["ref_on_sd"]
    assert stats["errors_by_kind"] == {"generation_error": 5} and stats["kept"] == 18
    assert {r["mode"] for r in idx.values()} == {"txt2img", "img2img", "inpaint", "outpaint"}


def test_every_mode_and_adapter_equals_a_direct_diffusers_call(modes_run, generation_models, data, refs):
    gm, got, rows = generation_models, members(modes_run["out"]), modes_run["rows"]
    sd, cn = gm["sd_model"], gm["controlnet"]
    src = Image.open(data / "src.png").convert("RGB")
    small = np.asarray(Image.open(data / "small.png").convert("RGB"))
    center = np.zeros((64, 64), np.uint8)
    center[16:48, 16:48] = 255
    border = np.full((64, 64), 255, np.uint8)
    border[8:56, 8:56] = 0

    def canvas(left, top, right, bottom):
        c = np.pad(small, ((top, bottom), (left, right), (0, 0)), mode="edge")
        m = np.full(c.shape[:2], 255, np.uint8)
        m[top:top + 40, left:left + 48] = 0
        return Image.fromarray(c), Image.fromarray(m)

    def canny(img):
        import cv2

        e = cv2.Canny(np.asarray(img), 100, 200)
        return Image.fromarray(np.stack([e] * 3, axis=2))

    def mask(a):
        return Image.fromarray(a)

    from shardsmith.filters.augment import resize_cover
    from shardsmith.filters.conditioning import strategy_mask

    wds = resize_cover(Image.open(io.BytesIO(modes_run["src"].image)).convert("RGB"), (64, 64))
    style, subject, ti = (gm["lora"], 0.7), (gm["lora_2"], 1.0), gm["textual_inversion"]
    inp = dict(width=64, height=64)
    calls = {  # key -> (pipeline class, controlnet, loras, embeddings, call kwargs)
        "t2i": ("StableDiffusionPipeline", None, (), (), inp),
        "plain_after": ("StableDiffusionPipeline", None, (), (), inp),
        "plain_last": ("StableDiffusionPipeline", None, (), (), inp),
        "i2i": ("StableDiffusionImg2ImgPipeline", None, (), (), dict(image=src, strength=0.6)),
        "i2i_wds": ("StableDiffusionImg2ImgPipeline", None, (), (), dict(image=wds, strength=0.8)),
        "inp_file": ("StableDiffusionInpaintPipeline", None, (), (),
                     dict(image=src, mask_image=Image.open(data / "mask.png"), strength=1.0, **inp)),
        "inp_box": ("StableDiffusionInpaintPipeline", None, (), (),
                    dict(image=src, mask_image=strategy_mask("random-box", (64, 64), 5, "inp_box"), strength=1.0, **inp)),
        "inp_border": ("StableDiffusionInpaintPipeline", None, (), (),
                       dict(image=src, mask_image=mask(border), strength=0.9, **inp)),
        "out_sides": ("StableDiffusionInpaintPipeline", None, (), (),
                      dict(zip(("image", "mask_image"), canvas(8, 8, 8, 16)), strength=1.0, **inp)),
        "out_size": ("StableDiffusionInpaintPipeline", None, (), (),
                     dict(zip(("image", "mask_image"), canvas(8, 12, 8, 12)), strength=1.0, **inp)),
        "cn_t2i": ("StableDiffusionControlNetPipeline", cn, (), (),
                   dict(image=canny(src), controlnet_conditioning_scale=0.5, **inp)),
        "cn_i2i": ("StableDiffusionControlNetImg2ImgPipeline", cn, (), (),
                   dict(image=src, control_image=Image.open(data / "control.png").convert("RGB"), strength=0.8,
                        controlnet_conditioning_scale=1.0)),
        "cn_inp": ("StableDiffusionControlNetInpaintPipeline", cn, (), (),
                   dict(image=src, mask_image=mask(center), control_image=canny(src), strength=1.0,
                        controlnet_conditioning_scale=1.0, **inp)),
        "lora": ("StableDiffusionPipeline", None, (style,), (), inp),
        "lora2": ("StableDiffusionPipeline", None, (style, subject), (), inp),
        "lora_inp": ("StableDiffusionInpaintPipeline", None, (subject,), (),
                     dict(image=src, mask_image=mask(center), strength=1.0, **inp)),
        "ti": ("StableDiffusionPipeline", None, (), (ti,), inp),
        "ti_lora": ("StableDiffusionPipeline", None, ((gm["lora"], 1.0),), (ti,), inp),
    }
    assert {k[:-4] for k in got if k.endswith(".png")} == set(calls)
    base = None
    for key, (cls, controlnet, loras, tis, kw) in calls.items():
        row = rows[key]
        ref = refs.get(cls, sd, controlnet, loras, tis)(row["prompt"], num_inference_steps=STEPS,
                                                         generator=g(row["seed"]), **kw).images[0]
        ours = pixels(got[f"{key}.png"])
        assert ours.shape == np.asarray(ref).shape and np.array_equal(ours, np.asarray(ref)), key
        if key == "t2i":
            base = ours
        elif key in ("lora", "ti", "cn_t2i"):
            assert not np.array_equal(ours[..., :], base), f"{key} should change the image"
    assert np.array_equal(pixels(got["plain_after.png"]), base)  # no adapter leaked into a later row


def test_key_json_records_every_input_with_its_sha256(modes_run, generation_models, data):
    got = members(modes_run["out"])

    def sha(path):
        return hashlib.sha256(open(path, "rb").read()).hexdigest()

    lora_inp = json.loads(got["lora_inp.json"])
    assert lora_inp["mode"] == "inpaint" and lora_inp["strength"] == 1.0 and lora_inp["mask"] == "center"
    assert lora_inp["inputs"]["image"]["sha256"] == sha(data / "src.png")
    assert lora_inp["inputs"]["mask"] == {"strategy": "center"}
    assert lora_inp["inputs"]["lora"] == [{"path": generation_models["lora_2"], "scale": 1.0,
                                           "sha256": sha(generation_models["lora_2"])}]
    assert lora_inp["extra"] == {"license": "cc-13"}
    comps = lora_inp["model_components"]
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(comps)
    unet_files = sorted(os.listdir(os.path.join(generation_models["sd_model"], "unet")))
    want = hashlib.sha256("\n".join(sorted(f"unet/{f}:{sha(os.path.join(generation_models['sd_model'], 'unet', f))}"
                                           for f in unet_files)).encode()).hexdigest()
    assert comps["unet"] == want  # the weights, not only the config
    inp = json.loads(got["inp_file.json"])
    assert inp["inputs"]["mask"]["sha256"] == sha(data / "mask.png")
    cn = json.loads(got["cn_i2i.json"])
    assert cn["inputs"]["control_image"]["sha256"] == sha(data / "control.png")
    assert cn["controlnet"]["model"] == generation_models["controlnet"] and len(cn["controlnet"]["fingerprint"]) == 64
    ti = json.loads(got["ti.json"])
    assert ti["inputs"]["textual_inversion"][0]["sha256"] == sha(generation_models["textual_inversion"])
    wds = json.loads(got["i2i_wds.json"])
    assert wds["inputs"]["image"]["sha256"] == hashlib.sha256(modes_run["src"].image).hexdigest()
    assert wds["inputs"]["image"]["ref"]["member"].startswith(modes_run["src"].key + ".")
    out = json.loads(got["out_sides.json"])
    assert (out["width"], out["height"], out["pad"]) == (64, 64, "8,8,8,16")
    png = got["lora_inp.png"]
    assert lora_inp["png_sha256"] == hashlib.sha256(png).hexdigest()


def test_a_resumed_run_is_identical_to_a_clean_one(modes_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(modes_run["out"], out)
    os.remove(out / "_ledger" / "00001.json")
    os.remove(out / "00001.tar")
    logs = []
    run_generate(modes_run["cfg"].__class__(**{**modes_run["cfg"].__dict__, "output": str(out)}), log=logs.append)
    assert "2 already committed, 1 to do" in logs[0]
    for f in ("00000.tar", "00001.tar", "00002.tar", "00000.parquet", "00001.parquet", "00002.parquet"):
        assert (out / f).read_bytes() == (modes_run["out"] / f).read_bytes(), f


def test_regenerate_rebuilds_bit_identical_images(modes_run, tmp_path, capsys):
    from shardsmith.jobs.regenerate import main

    out = modes_run["out"]
    shard_of = {k: f for f in sorted(os.listdir(out)) if f.endswith(".tar")
                for k in {m.split(".")[0] for m in tarfile.open(out / f).getnames()}}
    for key in ("lora_inp", "cn_inp", "i2i_wds", "out_sides", "ti_lora"):
        assert main([str(out / shard_of[key]), key]) == 0, capsys.readouterr()
        assert f"{key}: bit-identical" in capsys.readouterr().out
    record = json.loads(members(out)["cn_t2i.json"])
    (tmp_path / "cn_t2i.json").write_text(json.dumps(record))
    assert main([str(tmp_path / "cn_t2i.json"), "--out", str(tmp_path / "again.png")]) == 0
    assert "bit-identical: pixels sha256 matches the record" in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png").convert("RGB")), pixels(members(out)["cn_t2i.png"]))
    # a record that does not describe the image: not identical, and the changed input is named
    record["task"]["seed"] += 1
    record["inputs"]["image"]["sha256"] = "0" * 64
    (tmp_path / "changed.json").write_text(json.dumps(record))
    assert main([str(tmp_path / "changed.json")]) == 1
    text = capsys.readouterr().out
    assert "cn_t2i: NOT identical" in text and "changed since: input image" in text
    assert main([str(out / "00002.tar"), "bad_lora"]) == 2  # an error row has no KEY.json
    assert "error rows have no KEY.json" in capsys.readouterr().err


def test_adapters_are_loaded_once_and_leave_no_trace(generation_models):
    """In one actor's pipeline: LoRAs kept loaded but inactive for rows without them, embeddings
    unloaded, failed loads leave nothing; unload_adapters gives back the plain pipeline."""
    from shardsmith.filters.diffusion import AdapterError, Diffuser, DiffusionSpec, Request

    gm = generation_models
    dif = Diffuser(DiffusionSpec(gm["sd_model"], dtype="float32"))

    def req(prompt, seed, loras=(), tis=()):
        return Request("txt2img", prompt, None, seed, STEPS, 7.5, 64, 64, loras=loras, textual_inversions=tis)

    emb = dif.t2i.text_encoder.get_input_embeddings().weight.detach().clone()
    vocab = len(dif.t2i.tokenizer)
    plain = np.asarray(dif.run([req("a <tinycat>", 1)])[0].image)
    dif.run([req("a cat", 1, ((gm["lora"], 0.7),))])
    loaded = dict(dif._loras)
    dif.run([req("a cat", 1, ((gm["lora"], 0.5), (gm["lora_2"], 1.0)))])
    dif.run([req("a <tinycat>", 1, (), ((gm["textual_inversion"], None),))])
    assert len(dif.t2i.tokenizer) == vocab + 1
    with pytest.raises(AdapterError, match="does not fit"):
        dif.run([req("a cat", 1, ((gm["lora_other_model"], 1.0),))])
    with pytest.raises(AdapterError, match="does not fit"):
        dif.run([req("a cat", 1, (), ((gm["textual_inversion_wrong_dim"], None),))])
    again = np.asarray(dif.run([req("a <tinycat>", 1)])[0].image)
    assert np.array_equal(again, plain)  # "<tinycat>" is plain text again, no LoRA active
    assert len(dif.t2i.tokenizer) == vocab and torch.equal(dif.t2i.text_encoder.get_input_embeddings().weight, emb)
    assert set(loaded) <= set(dif._loras) and len(dif._loras) == 2  # loaded once, kept; the failed one is not
    assert set(dif.t2i.get_list_adapters()["unet"]) == set(dif._loras)
    dif.unload_adapters()
    assert dif.t2i.get_list_adapters() == {} and not any("lora" in n for n, _ in dif.t2i.unet.named_modules())
    assert np.array_equal(np.asarray(dif.run([req("a <tinycat>", 1)])[0].image), plain)


def test_dedicated_inpainting_model(generation_models, data, refs):
    """A UNet with 9 input channels: inpaint and outpaint through the same auto-pipelines; the
    modes it cannot run are error rows."""
    from shardsmith.filters.diffusion import DiffusionSpec
    from shardsmith.pipelines.formats.prompts import plan_tasks, resolve_sources
    from shardsmith.pipelines.stages.diffuse import GenerateStage

    model = generation_models["inpaint_model"]
    rows = [{"key": "inp", "prompt": "a dog", "seed": 1, "image": "src.png", "mask": "mask.png", "mode": "inpaint"},
            {"key": "out", "prompt": "a dog", "seed": 2, "image": "small.png", "pad": "8,8,8,16", "mode": "outpaint"},
            {"key": "t2i", "prompt": "a dog", "seed": 3, "mode": "txt2img"}]
    cols = sorted({k for r in rows for k in r})
    tasks = plan_tasks(pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows]),
                       Defaults(num_inference_steps=STEPS, width=64, height=64))
    resolve_sources(tasks, str(data))
    stage = GenerateStage(DiffusionSpec(model, dtype="float32"), "cpu", torch.get_num_threads(), False)
    assert stage.diffuser.inpainting_unet
    out = stage({"shard": np.array(["0"] * 3, dtype=object), "row": np.arange(3),
                 "key": np.array([t.key for t in tasks], dtype=object),
                 "task": np.array([json.dumps(t.to_dict()) for t in tasks], dtype=object),
                 "params_key": np.array([t.group() for t in tasks], dtype=object)})
    by = {k: (png, err) for k, png, err in zip(out["key"], out["png"], out["error"])}
    assert "dedicated inpainting model (UNet with 9 input channels)" in by["t2i"][1]
    ref = refs.get("StableDiffusionInpaintPipeline", model)
    want = ref("a dog", image=Image.open(data / "src.png").convert("RGB"), mask_image=Image.open(data / "mask.png"),
               width=64, height=64, num_inference_steps=STEPS, generator=g(1)).images[0]
    assert np.array_equal(pixels(by["inp"][0]), np.asarray(want))
    small = np.asarray(Image.open(data / "small.png").convert("RGB"))
    c = np.pad(small, ((8, 16), (8, 8), (0, 0)), mode="edge")
    m = np.full((64, 64), 255, np.uint8)
    m[8:48, 8:56] = 0
    want = ref("a dog", image=Image.fromarray(c), mask_image=Image.fromarray(m), width=64, height=64,
               num_inference_steps=STEPS, generator=g(2)).images[0]
    assert np.array_equal(pixels(by["out"][0]), np.asarray(want))


def test_sdxl_base_and_refiner(ray_local, generation_models, data, tmp_path, refs):
    gm = generation_models
    rows = [{"key": "base", "prompt": "a cat", "seed": 1},
            {"key": "refined", "prompt": "a cat", "seed": 1, "refiner": gm["sdxl_refiner"], "high_noise_frac": 0.75},
            {"key": "i2i_refined", "prompt": "a cat", "seed": 2, "image": str(data / "src.png"),
             "refiner": gm["sdxl_refiner"]}]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    stats = run_generate(gen_cfg(prompts, tmp_path / "out", gm["sdxl_model"],
                                 defaults=Defaults(num_inference_steps=4, width=64, height=64)), **QUIET)
    assert stats["kept"] == 3, {k: r["error_message"] for k, r in index(tmp_path / "out").items()}
    got = members(tmp_path / "out")
    base = refs.get("StableDiffusionXLPipeline", gm["sdxl_model"])
    refiner = refs.get("StableDiffusionXLImg2ImgPipeline", gm["sdxl_refiner"], text_encoder_2=base.text_encoder_2,
                       vae=base.vae)
    want = base("a cat", num_inference_steps=4, width=64, height=64, generator=g(1), guidance_scale=7.5).images[0]
    assert np.array_equal(pixels(got["base.png"]), np.asarray(want))
    # guidance 7.5: shardsmith's default everywhere (SDXL's pipelines default to 5.0)
    gen = g(1)  # one generator per image, continued by the refiner
    lat = base("a cat", num_inference_steps=4, width=64, height=64, denoising_end=0.75, output_type="latent",
               generator=gen, guidance_scale=7.5).images
    want = refiner("a cat", image=lat, denoising_start=0.75, num_inference_steps=4, generator=gen,
                   guidance_scale=7.5).images[0]
    assert np.array_equal(pixels(got["refined.png"]), np.asarray(want))
    assert not np.array_equal(pixels(got["refined.png"]), pixels(got["base.png"]))
    i2i = refs.get("StableDiffusionXLImg2ImgPipeline", gm["sdxl_model"])
    gen = g(2)
    lat = i2i("a cat", image=Image.open(data / "src.png").convert("RGB"), strength=0.8, num_inference_steps=4,
              denoising_end=0.8, output_type="latent", generator=gen, guidance_scale=7.5).images
    want = refiner("a cat", image=lat, denoising_start=0.8, num_inference_steps=4, generator=gen,
                   guidance_scale=7.5).images[0]
    assert np.array_equal(pixels(got["i2i_refined.png"]), np.asarray(want))
    meta = json.loads(got["refined.json"])
    assert meta["high_noise_frac"] == 0.75 and meta["refiner"]["model"] == gm["sdxl_refiner"]
    assert meta["refiner"]["components"]["unet"] and meta["pipeline"] == "StableDiffusionXLPipeline"


def test_safety_checker_verdicts_are_recorded_and_flagged_images_never_written(ray_local, generation_models,
                                                                               tmp_path, refs):
    from shardsmith.jobs.tiny_generation import CALIBRATION_PROMPTS

    model = generation_models["safety_model"]
    rows = [{"key": f"s{i}", "prompt": p, "seed": i} for i, p in enumerate(CALIBRATION_PROMPTS[:8])]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    stats = run_generate(gen_cfg(prompts, tmp_path / "out", model), **QUIET)  # auto: on, the model ships one
    idx, got = index(tmp_path / "out"), members(tmp_path / "out")
    ref = refs.get("StableDiffusionPipeline", model)
    flagged = []
    for r in rows:
        o = ref(r["prompt"], num_inference_steps=STEPS, width=64, height=64, generator=g(r["seed"]))
        verdict = o.nsfw_content_detected[0]
        row = idx[r["key"]]
        assert row["nsfw_content_detected"] is verdict
        if verdict:
            flagged.append(r["key"])
            assert row["status"] == "error" and row["reason"] == "unsafe_content" and "safety checker" in row["error_message"]
            assert f"{r['key']}.png" not in got and f"{r['key']}.json" not in got
        else:
            assert np.array_equal(pixels(got[f"{r['key']}.png"]), np.asarray(o.images[0]))
            assert json.loads(got[f"{r['key']}.json"])["nsfw_content_detected"] is False
    assert 0 < len(flagged) < len(rows)
    assert stats["errors_by_kind"] == {"unsafe_content": len(flagged)} and stats["kept"] == len(rows) - len(flagged)

    # off: nothing is checked, every image is written, and equals a pipeline without the checker
    from shardsmith.filters.diffusion import Diffuser, DiffusionSpec, Request

    dif = Diffuser(DiffusionSpec(model, safety_checker="off", dtype="float32"))
    assert not dif.safety_checker
    made = dif.run([Request("txt2img", rows[int(flagged[0][1:])]["prompt"], None, int(flagged[0][1:]), STEPS, 7.5, 64, 64)])[0]
    assert made.nsfw is None
    plain = refs.get("StableDiffusionPipeline", model, safety_checker=None, requires_safety_checker=False)
    want = plain(rows[int(flagged[0][1:])]["prompt"], num_inference_steps=STEPS, width=64, height=64,
                 generator=g(int(flagged[0][1:]))).images[0]
    assert np.array_equal(np.asarray(made.image), np.asarray(want)) and np.asarray(want).any()


def test_batched_forward_equals_a_direct_call_with_the_same_batch(ray_local, generation_models, data, tmp_path, refs,
                                                                  capsys):
    sd = generation_models["sd_model"]
    rows = [{"key": f"b{i}", "prompt": f"a cat number {i}", "seed": 100 + i} for i in range(6)]
    rows += [{"key": "other_guidance", "prompt": "a dog", "seed": 7, "guidance_scale": 3.0},
             {"key": "i2i", "prompt": "a dog", "seed": 8, "image": "src.png"}]
    prompts = write_jsonl(data / "batch.jsonl", rows)
    out = tmp_path / "out"
    stats = run_generate(gen_cfg(prompts, out, sd, batch_forward=True, batch_size=4), **QUIET)
    assert stats["kept"] == 8
    got = members(out)
    meta = {k[:-5]: json.loads(v) for k, v in got.items() if k.endswith(".json")}
    batches = {}
    for k, m in meta.items():
        if m.get("forward"):
            batches.setdefault(tuple(x["key"] for x in m["forward"]["members"]), []).append(k)
    assert sorted(batches) == [("b0", "b1", "b2", "b3"), ("b4", "b5"), ("other_guidance",)]  # shard order, 4 at most
    assert "forward" not in meta["i2i"]  # img2img: a call of its own
    batches.pop(("other_guidance",))  # a forward of one: the per-image call (checked by the other tests)
    pipe = refs.get("StableDiffusionPipeline", sd)
    for keys in batches:
        rs = [next(r for r in rows if r["key"] == k) for k in keys]
        want = pipe([r["prompt"] for r in rs], num_inference_steps=STEPS, width=64, height=64,
                    generator=[g(r["seed"]) for r in rs]).images
        for k, w in zip(keys, want):
            assert np.array_equal(pixels(got[f"{k}.png"]), np.asarray(w)), k
    from shardsmith.jobs.regenerate import main

    assert main([str(out / "00000.tar"), "b2"]) == 0
    assert "b2: bit-identical" in capsys.readouterr().out


def test_augment_structure_preserving_variants_with_a_controlnet(ray_local, generation_models, sample, tmp_path, refs):
    from shardsmith.filters.augment import resize_cover, target_size
    from shardsmith.pipelines.flows.augment import run_augment
    from shardsmith.pipelines.formats.tar import iter_tar_samples

    gm = generation_models
    cfg = GenerateConfig(output=str(tmp_path / "aug"), model=gm["sd_model"], input=sample["shards"][1], variants=1,
                         strength=0.5, max_side=64, limit=3, num_actors=1, watermark=False, progress=False, dtype="float32",
                         defaults=Defaults(num_inference_steps=STEPS, seed=5, controlnet=gm["controlnet"],
                                           control="canny"))
    stats = run_augment(cfg, **QUIET)
    got = members(tmp_path / "aug")
    srcs = [s for s in iter_tar_samples(sample["shards"][1])][:3]
    ok = [s for s in srcs if s.error_kind is None]
    assert stats["kept"] == len(ok) >= 2
    ref = refs.get("StableDiffusionControlNetImg2ImgPipeline", gm["sd_model"], gm["controlnet"])
    import cv2

    for s in ok:
        img = Image.open(io.BytesIO(s.image)).convert("RGB")
        fitted = resize_cover(img, target_size(*img.size, max_side=64))
        e = cv2.Canny(np.asarray(fitted), 100, 200)
        meta = json.loads(got[f"{s.key}_v0.json"])
        want = ref(s.caption() or "", image=fitted, control_image=Image.fromarray(np.stack([e] * 3, axis=2)),
                   strength=0.5, controlnet_conditioning_scale=1.0,  # shardsmith's default; this pipeline's is 0.8
                   num_inference_steps=STEPS, generator=g(meta["seed"])).images[0]
        assert np.array_equal(pixels(got[f"{s.key}_v0.png"]), np.asarray(want)), s.key
        assert meta["controlnet"]["model"] == gm["controlnet"] and meta["control"] == "canny"
