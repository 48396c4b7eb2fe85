"""LAION's own watermark model as a score: ``pwatermark`` from ``laion-watermark-effnet``, a second
forward on its own 256x256 input, decoded once with the CLIP input. Its scores must equal the
reference computation of LAION-5B-WatermarkDetection (torchvision transforms on the PIL image,
timm forward, softmax index 0), written here, to 1e-4; in curate too, through a named predictor
served by a loopback mirror at its original path.

The state dict is random (the real efficientnet_b3 architecture, its BatchNorm statistics set
from random images so that the output depends on the input), built here."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from predictor_mirror import Mirror
from torch import nn

from shardsmith.filters.predictors import BUILTIN_PREDICTORS

WM_URL = BUILTIN_PREDICTORS["laion-watermark-effnet"].url


def laion_watermark_model():
    """As LAION-5B-WatermarkDetection's inference.py builds it."""
    import timm

    model = timm.create_model("efficientnet_b3a", pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(nn.Linear(in_features=1536, out_features=625), nn.ReLU(), nn.Dropout(p=0.3),
                                     nn.Linear(in_features=625, out_features=256), nn.ReLU(),
                                     nn.Linear(in_features=256, out_features=2))
    return model


def laion_preprocessing():
    from torchvision import transforms as T

    return T.Compose([T.Resize((256, 256)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])


@pytest.fixture(scope="module")
def watermark_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = laion_watermark_model()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # one batch sets the statistics
    calib = torch.rand(2, 3, 256, 256) * 4 - 2
    model.train()
    with torch.no_grad():
        model(calib)
        model.eval()
        feats = model.classifier[:5](model.forward_head(model.forward_features(calib), pre_logits=True))
        model.classifier[5].weight.normal_(0, 1 / (16 * float(feats.std()) + 1e-12))
        model.classifier[5].bias.zero_()
    path = tmp_path_factory.mktemp("wm") / "watermark_model_v1.pt"
    torch.save({"weights": model.state_dict()}, path)  # inference.py reads torch.load(...)["weights"]
    return str(path), model.eval()


def images(n=3, seed=0):
    from shardsmith.jobs.sample_data import add_watermark, texture

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = texture(rng, int(rng.integers(90, 400)), int(rng.integers(90, 400)))
        out.append(add_watermark(img, rng) if i % 2 else img)
    out[-1] = out[-1].convert("RGBA")  # convert("RGB") is part of the preprocessing
    return out


def reference(model, imgs) -> np.ndarray:
    pre = laion_preprocessing()
    with torch.no_grad():
        batch = torch.stack([pre(im.convert("RGB")) for im in imgs])
        return torch.nn.functional.softmax(model(batch), dim=1)[:, 0].numpy()


def png_rgb(img) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_pwatermark_equals_laions_reference(tiny_models, watermark_weights):
    from shardsmith.filters.clip import ClipSpec
    from shardsmith.filters.scorer import Scorer, ScorerSpec
    from shardsmith.filters.scores import HeadSpec, ScoreSet, declared_score
    from shardsmith.pipelines.stages.decode import decode_batch

    path, model = watermark_weights
    spec = ScorerSpec(ClipSpec(tiny_models["clip_model"], tiny_models["clip_pretrained"]),
                      {"pwatermark": HeadSpec("laion-watermark-effnet", path)}, similarity=False,
                      scores=ScoreSet.for_run([declared_score("pwatermark", "laion-watermark-effnet")]))
    assert list(spec.pixel_inputs()) == ["pixels_squash256"]
    scorer = Scorer(spec, device="cpu")
    imgs = images()
    data = [png_rgb(im) if i < 2 else _png_rgba(im) for i, im in enumerate(imgs)]
    n = len(data)
    batch = {"row": np.arange(n), "image": np.array(data, dtype=object), "error_kind": np.array([None] * n),
             "error": np.array([None] * n), "key": np.array([str(i) for i in range(n)], dtype=object)}
    out = decode_batch(batch, scorer.pixel_transform, scorer.embedder.image_size, 10**8, False,
                       pixel_inputs=spec.pixel_inputs())
    assert out["pixels_squash256"].shape == (n, 256, 256, 3)
    got = scorer.score(out["pixels"], fixed_batch=2, inputs={"pixels_squash256": out["pixels_squash256"]})
    decoded = [Image.open(io.BytesIO(d)) for d in data]
    ref = reference(model, decoded)
    np.testing.assert_allclose(got["pwatermark"], ref, rtol=0, atol=1e-4)
    assert np.ptp(ref) > 1e-3  # the scores differ between images: a comparison that can fail


def _png_rgba(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def wm_shard(tmp_path_factory):
    from shardsmith.pipelines.formats.tar import TarWriter

    d = tmp_path_factory.mktemp("wmshard")
    imgs = images(4, seed=1)
    with open(d / "00000.tar", "wb") as f, TarWriter(f) as tar:
        for i, im in enumerate(imgs):
            tar.add_sample(f"k{i}", {"png": _png_rgba(im), "txt": b"a photo"})
        tar.add_sample("broken", {"jpg": b"not an image", "txt": b"x"})
    return str(d), imgs


def test_curate_scores_pwatermark_with_laions_model_by_name(ray_local, tiny_models, watermark_weights, wm_shard,
                                                            tmp_path, monkeypatch):
    from conftest import curate_config, read_scores

    from shardsmith.pipelines.flows.curate import run_curate

    path, model = watermark_weights
    monkeypatch.setenv("SHARDSMITH_CACHE", str(tmp_path / "cache"))
    shard_dir, imgs = wm_shard
    with Mirror(str(tmp_path / "mirror")) as mirror:
        mirror.put(WM_URL, open(path, "rb").read())
        monkeypatch.setenv("SHARDSMITH_PREDICTOR_MIRROR", mirror.url)
        cfg = curate_config(shard_dir, tmp_path / "out", tiny_models, watermark_head="laion-watermark-effnet",
                            preset=None, rules=["pwatermark < 0.8"], batch_size=4, similarity=False)
        lines = []
        stats = run_curate(cfg, log=lines.append)
        assert mirror.count(WM_URL) == 1  # the driver fetched it; the actors used this node's copy
    scores = {r["key"]: r for r in read_scores(tmp_path / "out").to_pylist()}
    ref = reference(model, imgs)
    np.testing.assert_allclose([scores[f"k{i}"]["pwatermark"] for i in range(4)], ref, rtol=0, atol=1e-4)
    assert scores["broken"]["status"] == "error" and scores["broken"]["pwatermark"] is None
    assert stats["kept"] + stats["dropped"] + stats["errors"] == 5
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    rec = manifest["models"]["heads"]["pwatermark"]
    data = open(path, "rb").read()
    import hashlib

    assert rec["arch"] == "laion-watermark-effnet"
    assert rec["predictor"] == {"name": "laion-watermark-effnet", "url": WM_URL,
                                "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "format": "laion-watermark-effnet", "clip": None}
    assert manifest["fingerprint"]["predictors"]["laion-watermark-effnet"]["sha256"] == rec["predictor"]["sha256"]
    score_entry = next(s for s in manifest["models"]["scores"] if s["name"] == "pwatermark")
    assert score_entry["consumes"] == "pixels" and score_entry["arch"] == "laion-watermark-effnet"
    assert any("no sha256 pinned" in line and rec["predictor"]["sha256"] in line for line in lines)
