"""Named predictors: fetched once through a mirror (a loopback server holding files at their
original paths), verified by sha256 (a tampered file is refused and nothing cached), cached, used
offline, unpacked or converted, and listed/fetched/verified by ``shardsmith predictors``."""

import hashlib
import io
import multiprocessing
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from predictor_mirror import Mirror

from shardsmith.errors import ConfigError
from shardsmith.filters.heads import ARCH_CLASSES, AestheticMLP, load_head_spec
from shardsmith.filters.predictors import (
    BUILTIN_PREDICTORS,
    FORMATS,
    Predictor,
    PredictorError,
    mirror_url,
    predictor_table,
    resolve,
)
from shardsmith.filters.scores import HEAD_ARCHS, HeadSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AES_URL = BUILTIN_PREDICTORS["laion-aesthetic-v2"].url
WM_URL = BUILTIN_PREDICTORS["laion-watermark-effnet"].url


def torch_bytes(sd: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def aesthetic_file(seed=0, d=64) -> tuple[bytes, AestheticMLP]:
    torch.manual_seed(seed)
    m = AestheticMLP(d).eval()
    return torch_bytes(m.state_dict()), m


@pytest.fixture()
def mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDSMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SHARDSMITH_OFFLINE", raising=False)
    with Mirror(str(tmp_path / "mirror")) as m:
        monkeypatch.setenv("SHARDSMITH_PREDICTOR_MIRROR", m.url)
        yield m


def cache_files(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if not f.endswith(".lock"))


def test_the_builtin_table_is_consistent():
    for name, p in BUILTIN_PREDICTORS.items():
        assert p.name == name and p.builtin
        assert p.format in FORMATS and p.arch in HEAD_ARCHS and p.arch in ARCH_CLASSES
        assert p.sha256 is None or (len(p.sha256) == 64 and int(p.sha256, 16) >= 0)
        assert (p.sha256 is None) == (p.size is None)
        assert p.url.startswith("https://")
    assert BUILTIN_PREDICTORS["laion-aesthetic-v2"].sha256 == \
        "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"


def test_mirror_url_keeps_host_and_path():
    os.environ["SHARDSMITH_PREDICTOR_MIRROR"] = "http://mirror.internal/p/"
    try:
        assert mirror_url(AES_URL) == ("http://mirror.internal/p/github.com/christophschuhmann/"
                                       "improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth")
        os.environ["SHARDSMITH_PREDICTOR_MIRROR"] = "/shared/predictors"  # a folder: the cache's own names
        assert mirror_url(AES_URL).endswith("raw/main/sac+logos+ava1-l14-linearMSE.pth")
    finally:
        del os.environ["SHARDSMITH_PREDICTOR_MIRROR"]


def test_a_pinned_builtin_is_fetched_once_verified_and_cached(mirror, tmp_path):
    data, model = aesthetic_file()
    pinned = predictor_table({"laion-aesthetic-v2": {"sha256": sha(data)}})["laion-aesthetic-v2"]
    assert pinned.url == AES_URL and pinned.size is None
    mirror.put(AES_URL, data)
    r = resolve(pinned)
    assert r.downloaded and r.predictor.sha256 == sha(data) and r.predictor.size == len(data)
    assert r.path == str(tmp_path / "cache" / "predictors" / "github.com" / "christophschuhmann" /
                         "improved-aesthetic-predictor" / "raw" / "main" / "sac+logos+ava1-l14-linearMSE.pth")
    again = resolve(pinned)
    assert not again.downloaded and mirror.count(AES_URL) == 1
    head = load_head_spec("aesthetic", HeadSpec(pinned.arch, "", pinned), embed_dim=64)
    x = torch.nn.functional.normalize(torch.randn(5, 64), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(head(x), model(x))


def test_a_tampered_file_is_refused_and_nothing_is_cached(mirror, tmp_path):
    tampered = aesthetic_file(1)[0]  # not the published file: its size and sha256 differ from the pins
    mirror.put(AES_URL, tampered)
    with pytest.raises(PredictorError) as e:
        resolve(BUILTIN_PREDICTORS["laion-aesthetic-v2"])
    msg = str(e.value)
    assert "\n" not in msg and AES_URL in msg and "nothing cached" in msg
    assert BUILTIN_PREDICTORS["laion-aesthetic-v2"].sha256 in msg and sha(tampered) in msg
    assert cache_files(tmp_path) == []
    # the same when the size agrees and only the bytes differ
    data, _ = aesthetic_file(2)
    p = Predictor("mine", "https://models.example.org/h/aes.pth", "laion-aesthetic", "0" * 64, len(data))
    mirror.put(p.url, data)
    with pytest.raises(PredictorError, match=f"sha256 {sha(data)}, expected {'0' * 64}: refused, nothing cached"):
        resolve(p)
    assert cache_files(tmp_path) == []


def test_cli_refuses_a_tampered_builtin_with_exit_2(mirror, tmp_path):
    mirror.put(AES_URL, aesthetic_file(3)[0])
    r = subprocess.run([sys.executable, "-m", "shardsmith.jobs.cli", "predictors", "fetch", "laion-aesthetic-v2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "laion-aesthetic-v2" in r.stderr and "refused" in r.stderr
    assert cache_files(tmp_path) == []


def test_unpinned_records_the_hash_seen_first_and_a_later_pin_is_checked(mirror, tmp_path):
    data = torch_bytes({"weight": torch.randn(1, 8), "bias": torch.zeros(1)})
    p = Predictor("v1", "https://models.example.org/v1.pth?raw=true", "linear")
    mirror.put(p.url, data)
    r = resolve(p)
    assert r.predictor.sha256 == sha(data) and r.predictor.size == len(data)
    mirror.put(p.url, data + b"\0")  # upstream changed; the cached file is kept for the unpinned name
    assert resolve(p).predictor.sha256 == sha(data)
    with pytest.raises(PredictorError, match="expected"):  # pinned to another hash: fetched again and refused
        resolve(Predictor("v1", p.url, "linear", "a" * 64))


def test_offline_uses_only_the_cache_and_names_the_file(mirror, tmp_path, monkeypatch):
    data, _ = aesthetic_file()
    p = Predictor("mine", "https://models.example.org/offline/aes.pth", "laion-aesthetic", sha(data))
    mirror.put(p.url, data)
    monkeypatch.delenv("SHARDSMITH_PREDICTOR_MIRROR")
    monkeypatch.setenv("SHARDSMITH_OFFLINE", "1")
    with pytest.raises(PredictorError) as e:
        resolve(p)
    target = str(tmp_path / "cache" / "predictors" / "models.example.org" / "offline" / "aes.pth")
    assert target in str(e.value) and "SHARDSMITH_OFFLINE=1" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("SHARDSMITH_PREDICTOR_MIRROR", mirror.url)  # a mirror is still used
    resolve(p)
    monkeypatch.delenv("SHARDSMITH_PREDICTOR_MIRROR")
    assert resolve(p).path == target and mirror.count(p.url) == 1  # offline again: from the cache


def _resolve_in_child(p, q):
    try:
        q.put(resolve(p).predictor.sha256)
    except Exception as e:  # pragma: no cover - reported to the parent
        q.put(repr(e))


def test_concurrent_processes_of_a_node_fetch_once(mirror):
    data, _ = aesthetic_file()
    p = Predictor("mine", "https://models.example.org/concurrent/aes.pth", "laion-aesthetic", sha(data))
    mirror.put(p.url, data)
    mirror.delay = 0.5  # every process asks while the first download is under way
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_child, args=(p, q)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [q.get(timeout=5) for _ in procs] == [sha(data)] * 4
    assert mirror.count(p.url) == 1


def test_a_zip_holding_one_weights_file_is_unpacked(mirror, tmp_path):
    from test_heads import NemoNSFWModel

    torch.manual_seed(4)
    ref = NemoNSFWModel(32).eval()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("clip_autokeras_binary_nsfw.pth", torch_bytes(ref.state_dict()))
    p = predictor_table({"my-nsfw": {"url": "https://models.example.org/nsfw.zip", "format": "laion-nsfw-torch",
                                     "sha256": sha(buf.getvalue())}})["my-nsfw"]
    mirror.put(p.url, buf.getvalue())
    r = resolve(p)
    assert r.path.endswith("nsfw.zip.d/clip_autokeras_binary_nsfw.pth")
    head = load_head_spec("punsafe", HeadSpec(p.arch, "", p), embed_dim=32)
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(x), ref(x).squeeze(-1))
    two = io.BytesIO()
    with zipfile.ZipFile(two, "w") as z:
        z.writestr("a.pth", b"x")
        z.writestr("b.pth", b"y")
    q = Predictor("two", "https://models.example.org/two.zip", "laion-nsfw-torch")
    mirror.put(q.url, two.getvalue())
    with pytest.raises(PredictorError, match="holding 2 weights files"):
        resolve(q)


def test_the_keras_zip_is_converted_on_fetch(mirror, tmp_path):
    from test_keras_nsfw import keras_forward, keras_nsfw_tensors, saved_model_zip

    rng = np.random.default_rng(7)
    tensors, n = keras_nsfw_tensors(rng)
    data = open(saved_model_zip(tmp_path, tensors), "rb").read()
    url = BUILTIN_PREDICTORS["laion-nsfw-l14"].url
    mirror.put(url, data)
    p = predictor_table({"laion-nsfw-l14": {"sha256": sha(data)}})["laion-nsfw-l14"]
    head = load_head_spec("punsafe", HeadSpec(p.arch, "", p), embed_dim=24)
    x = rng.normal(0, 0.05, (10, 24)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(head(torch.from_numpy(x)).numpy(), keras_forward(tensors, n, x), atol=1e-6)


def test_declared_predictors_are_checked():
    with pytest.raises(ConfigError, match="predictors.x: url is required"):
        predictor_table({"x": {"format": "linear"}})
    with pytest.raises(ConfigError, match="unknown format 'onnx'"):
        predictor_table({"x": {"url": "https://a/b.onnx", "format": "onnx"}})
    with pytest.raises(ConfigError, match="64 hex digits"):
        predictor_table({"laion-aesthetic-v2": {"sha256": "abc"}})
    with pytest.raises(ConfigError, match="unknown key 'md5'"):
        predictor_table({"x": {"url": "https://a/b", "format": "linear", "md5": "0"}})


def test_predictors_cli_list_fetch_verify(mirror, tmp_path):
    data, _ = aesthetic_file()
    mirror.put(AES_URL, data)
    env = {**os.environ}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "shardsmith.jobs.cli", "predictors", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)

    r = cli("list")
    assert r.returncode == 0 and "laion-watermark-effnet" in r.stdout and "not pinned" in r.stdout
    r = cli("fetch", "laion-aesthetic-v2", "--sha256", f"laion-aesthetic-v2={sha(data)}")
    assert r.returncode == 0 and sha(data) in r.stdout, r.stderr
    r = cli("verify")
    assert r.returncode == 2 and "laion-aesthetic-v2: BAD" in r.stdout  # the cached file is not the pinned one
    r = cli("verify", "--sha256", f"laion-aesthetic-v2={sha(data)}")
    assert r.returncode == 0 and "laion-aesthetic-v2: ok" in r.stdout, r.stdout + r.stderr
    path = resolve(predictor_table({"laion-aesthetic-v2": {"sha256": sha(data)}})["laion-aesthetic-v2"]).path
    with open(path, "r+b") as f:  # damaged on disk
        f.seek(100)
        f.write(b"\xff\xff")
    r = cli("verify", "--sha256", f"laion-aesthetic-v2={sha(data)}")
    assert r.returncode == 2 and "changed on disk" in r.stdout


def reference_embeddings(tiny_models, shard) -> dict[str, torch.Tensor]:
    """open_clip's own preprocess and encode_image, L2-normalised, for each readable image."""
    import tarfile

    import open_clip
    from PIL import Image

    open_clip.add_model_config(tiny_models["clip_model"])
    name = os.path.basename(tiny_models["clip_model"])[:-5]
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tiny_models["clip_pretrained"])
    out = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if ext not in ("jpg", "png", "webp"):
                continue
            try:
                x = preprocess(Image.open(io.BytesIO(tar.extractfile(m).read()))).unsqueeze(0)
            except Exception:
                continue  # the broken samples
            with torch.no_grad():
                out[key] = torch.nn.functional.normalize(model.eval().encode_image(x).float(), dim=-1)[0]
    return out


def test_curate_with_declared_and_builtin_predictors_equals_references(ray_local, tiny_models, sample, mirror,
                                                                        tmp_path):
    import json

    import yaml
    from conftest import read_scores
    from test_heads import NemoNSFWModel

    from shardsmith.jobs.cli import build_parser
    from shardsmith.jobs.curate import config_from_args
    from shardsmith.pipelines.flows.curate import run_curate

    torch.manual_seed(8)
    nsfw = NemoNSFWModel(64).eval()
    with torch.no_grad():
        nsfw.norm.variance.uniform_(0.5e-3, 2e-3)
        nsfw.linear_4.bias.fill_(2.0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # the layout NeMo Curator downloads: one .pth in a zip
        z.writestr("clip_autokeras_binary_nsfw.pth", torch_bytes(nsfw.state_dict()))
    nsfw_url = "https://models.example.org/nsfw/clip_autokeras_binary_nsfw.zip"
    mirror.put(nsfw_url, buf.getvalue())
    aes_bytes, aes = aesthetic_file(seed=6)
    mirror.put(AES_URL, aes_bytes)
    cfg_file = tmp_path / "curate.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "clip_model": tiny_models["clip_model"], "clip_pretrained": tiny_models["clip_pretrained"], "preset": "none",
        "predictors": {"my-nsfw": {"url": nsfw_url, "sha256": sha(buf.getvalue()), "format": "laion-nsfw-torch"}},
        "heads": {"punsafe": {"predictor": "my-nsfw"}}, "rules": ["punsafe < 0.9"], "batch_size": 16,
        "precision": "fp32"}))  # the references below are fp32
    shard = sample["shards"][0]
    args = build_parser().parse_args(["curate", shard, str(tmp_path / "out"), "--config", str(cfg_file), "--quiet",
                                      "--aesthetic-head", "laion-aesthetic-v2", "--no-report",
                                      "--predictor-sha256", f"laion-aesthetic-v2={sha(aes_bytes)}"])
    cfg = config_from_args(args)
    lines = []
    run_curate(cfg, log=lines.append)
    ref = reference_embeddings(tiny_models, shard)
    rows = {r["key"]: r for r in read_scores(tmp_path / "out").to_pylist() if r["status"] != "error"}
    common = sorted(set(ref) & set(rows))
    assert len(common) >= 10
    x = torch.stack([ref[k] for k in common])
    with torch.no_grad():
        np.testing.assert_allclose([rows[k]["punsafe"] for k in common], nsfw(x).squeeze(-1).numpy(), atol=1e-4)
        np.testing.assert_allclose([rows[k]["aesthetic"] for k in common], aes(x).squeeze(-1).numpy(), atol=1e-4)
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    heads = manifest["models"]["heads"]
    assert heads["punsafe"]["predictor"]["name"] == "my-nsfw" and heads["punsafe"]["predictor"]["url"] == nsfw_url
    assert heads["punsafe"]["predictor"]["sha256"] == sha(buf.getvalue())
    assert heads["punsafe"]["predictor"]["size"] == len(buf.getvalue())
    assert heads["aesthetic"]["predictor"] == {"name": "laion-aesthetic-v2", "url": AES_URL, "sha256": sha(aes_bytes),
                                               "size": len(aes_bytes), "format": "laion-aesthetic",
                                               "clip": "ViT-L-14-quickgelu/openai"}
    assert any("reads ViT-L-14-quickgelu/openai embeddings" in line for line in lines)  # a warning, said once
    assert mirror.count(nsfw_url) == 1 and mirror.count(AES_URL) == 1


def test_head_predictor_config_forms_and_errors(tmp_path):
    from shardsmith.pipelines.config import CurateConfig, parse_head_flag

    assert parse_head_flag("pwm=laion-watermark-effnet") == ("pwm", {"predictor": "laion-watermark-effnet"})
    assert parse_head_flag("pcartoon=linear:s3://m/c.pth") == ("pcartoon", {"arch": "linear", "weights": "s3://m/c.pth"})
    ok = CurateConfig(input="x", output="y", watermark_head="laion-watermark-effnet",
                      heads={"punsafe": {"predictor": "laion-nsfw-l14", "label": "unsafe"}})
    ok.validate()
    assert ok.score_set()["pwatermark"].consumes == "pixels" and ok.score_set()["punsafe"].label == "unsafe"
    assert ok.head_specs()["punsafe"].predictor.format == "laion-nsfw-keras"
    for heads, msg in (({"punsafe": {"predictor": "laion-nsfw-l14", "arch": "linear"}}, "not both"),
                       ({"pcartoon": {"predictor": "nope"}}, "unknown predictor 'nope'"),
                       ({"pwatermark": {"predictor": "laion-aesthetic-v2"}}, "outside the range of pwatermark")):
        with pytest.raises(ConfigError, match=msg):
            CurateConfig(input="x", output="y", heads=heads).validate()
