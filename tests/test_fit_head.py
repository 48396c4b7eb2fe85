"""fit-head: heads of your own from labelled embeddings. A planted signal must come out with a
held-out AUC >= 0.95, the head must load in curate (and be refused with another CLIP model), and
make-watermark-data must give labelled shards that fit-head --images embeds on the fly."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardsmith.errors import ConfigError, InputError
from shardsmith.filters.fit import FitOptions, auc, fit_head, folds, spearman
from shardsmith.jobs.cli import main as cli


def test_auc_and_spearman_against_brute_force():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60).astype(np.float32)
    s = np.round(rng.normal(size=60) + y, 1)  # ties on purpose
    pairs = [(a, b) for a in s[y == 1] for b in s[y == 0]]
    brute = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
    assert abs(auc(y, s) - brute) < 1e-12
    a = rng.normal(size=40)
    assert abs(spearman(a, a ** 3) - 1.0) < 1e-12 and abs(spearman(a, -a) + 1.0) < 1e-12
    parts = folds(y, 5, "binary", seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(60))
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 2
    assert all(abs(y[p].mean() - y.mean()) < 0.2 for p in parts)  # stratified


def planted(n=500, d=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = rng.normal(size=d)
    w /= np.linalg.norm(w)
    y = (x @ w + rng.normal(0, 0.02, n) > 0).astype(np.float32)
    return x.astype(np.float32), y, w


def fake_run(root, x, keys, tiny_models):
    """A curate output with embeddings in the clip-retrieval layout (as curate --embeddings writes)."""
    os.makedirs(root / "img_emb")
    os.makedirs(root / "metadata")
    np.save(root / "img_emb" / "img_emb_00000.npy", x.astype(np.float16))
    pq.write_table(pa.table({"key": keys, "status": ["kept"] * len(keys)}), root / "metadata" / "metadata_00000.parquet")
    (root / "manifest.json").write_text(json.dumps({"tool": "curate", "models": {
        "clip_model": tiny_models["clip_model"], "clip_pretrained": tiny_models["clip_pretrained"], "embed_dim": 64}}))
    return str(root)


@pytest.fixture(scope="module")
def planted_head(tmp_path_factory, tiny_models):
    d = tmp_path_factory.mktemp("fit")
    x, y, _ = planted()
    keys = [f"k{i:04d}" for i in range(len(y))]
    run = fake_run(d / "run", x, keys, tiny_models)
    labels = d / "labels.csv"
    labels.write_text("key,label\n" + "".join(f"{k},{int(v)}\n" for k, v in zip(keys, y)) + "nokey,1\n")
    head = str(d / "pplanted.safetensors")
    assert cli(["fit-head", run, str(labels), head, "--folds", "5", "--quiet"]) == 0
    return head


def test_planted_signal_gives_a_heldout_auc_above_095(planted_head):
    card = json.load(open(planted_head + ".json"))
    assert card["kind"] == "shardsmith-head" and card["arch"] == "probability" and card["task"] == "binary"
    assert card["metrics"]["auc"] >= 0.95, card["metrics"]
    assert 0.5 < card["metrics"]["accuracy"] <= 1.0
    assert len(card["per_fold"]) == 5 and sum(f["rows"] for f in card["per_fold"]) == 500
    assert card["data"]["rows"] == 500 and card["data"]["labelled_without_embedding"] == 1
    assert card["embed_dim"] == 64 and card["clip"] == "tiny-clip/tiny-clip.pt"
    html = open(planted_head + ".report.html").read()
    assert "Held-out metrics" in html and f"{card['metrics']['auc']:.4f}" in html
    assert os.path.getsize(planted_head + ".report/roc.png") > 1000


def test_chance_labels_give_chance_auc(tmp_path, tiny_models):
    x, _, _ = planted(seed=3)
    y = np.random.default_rng(9).integers(0, 2, len(x)).astype(np.float32)  # no signal
    rep = fit_head(x, y, 5, FitOptions("binary"))
    assert 0.35 < rep.metrics["auc"] < 0.65  # held out: the fit cannot invent a signal


def test_the_head_loads_in_curate_and_another_clip_is_refused(ray_local, tiny_models, sample, planted_head, tmp_path):
    from conftest import curate_config, read_scores
    from safetensors.numpy import load_file

    from shardsmith.jobs.tiny_models import write_tiny_clip
    from shardsmith.pipelines.flows.curate import run_curate
    from shardsmith.pipelines.formats.embeddings import iter_embeddings

    out = tmp_path / "out"
    cfg = curate_config(sample["images"] + "/00000.tar", out, tiny_models, preset=None, embeddings=True,
                        heads={"pplanted": {"arch": "probability", "weights": planted_head}})
    run_curate(cfg, log=lambda *a: None)
    scores = {r["key"]: r["pplanted"] for r in read_scores(out).to_pylist() if r["status"] != "error"}
    w = load_file(planted_head)
    for _, meta, emb in iter_embeddings(str(out)):
        ref = 1 / (1 + np.exp(-(emb.astype(np.float32) @ w["layers.0.weight"].T + w["layers.0.bias"])[:, 0]))
        got = np.array([scores[k] for k in meta.column("key").to_pylist()])
        np.testing.assert_allclose(got, ref, atol=5e-3)  # stored embeddings are fp16
    other_cfg, other_weights = write_tiny_clip(str(tmp_path / "clip-b"), name="tiny-clip-b", seed=1)
    cfg = curate_config(sample["images"] + "/00000.tar", tmp_path / "out-b", tiny_models, preset=None,
                        clip_model=other_cfg, clip_pretrained=other_weights,
                        heads={"pplanted": {"arch": "probability", "weights": planted_head}})
    with pytest.raises(ConfigError, match="fitted on tiny-clip/tiny-clip.pt embeddings .* this run's CLIP is "
                                          "tiny-clip-b/tiny-clip-b.pt"):
        run_curate(cfg, log=lambda *a: None)
    assert not os.path.exists(tmp_path / "out-b" / "manifest.json")


def test_twins_stay_in_one_fold():
    """A watermarked copy and its original have near-identical embeddings under a CLIP that cannot
    see the mark: split between folds, the twin leaks its label and the held-out AUC falls far
    below chance; grouped, it is chance, as it should be."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=(150, 32))
    x = np.concatenate([base, base + rng.normal(0, 1e-3, base.shape)]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.r_[np.zeros(150), np.ones(150)].astype(np.float32)
    groups = [f"g{i}" for i in range(150)] * 2
    leaky = fit_head(x, y, 5, FitOptions("binary"))
    grouped = fit_head(x, y, 5, FitOptions("binary"), groups=groups)
    assert leaky.metrics["auc"] < 0.3, leaky.metrics
    assert 0.35 < grouped.metrics["auc"] < 0.65, grouped.metrics
    for f in folds(y, 5, "binary", groups=groups):
        assert set(np.asarray(groups)[f]).isdisjoint(set(np.asarray(groups)[np.setdiff1d(np.arange(300), f)]))


def test_regression_recovers_a_planted_score():
    x, _, w = planted(400, 32, seed=5)
    y = (5 + 12 * (x @ w) + np.random.default_rng(1).normal(0, 0.1, len(x))).astype(np.float32)
    rep = fit_head(x, y, 4, FitOptions("regression", hidden=(16,), epochs=400))
    assert rep.metrics["spearman"] > 0.9 and rep.metrics["mse"] < 0.5 * float(y.var()), rep.metrics
    assert [m.out_features for m in rep.head.layers if hasattr(m, "out_features")] == [16, 1]


def test_bad_labels_are_one_line_errors(tmp_path, tiny_models):
    x, y, _ = planted(40)
    keys = [f"k{i}" for i in range(40)]
    run = fake_run(tmp_path / "run", x, keys, tiny_models)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": keys, "label": [0.5] * 40}), bad)
    from shardsmith.pipelines.config.fit_head import FitHeadConfig
    from shardsmith.pipelines.flows.fit_head import run_fit_head

    with pytest.raises(InputError, match="--task binary needs labels 0 and 1, found \\[0.5\\]"):
        run_fit_head(FitHeadConfig(output=str(tmp_path / "h.safetensors"), run=run, labels=str(bad)), log=print)
    nolabel = tmp_path / "nolabel.parquet"
    pq.write_table(pa.table({"key": keys, "y": [1] * 40}), nolabel)
    with pytest.raises(InputError, match="no column 'label'"):
        run_fit_head(FitHeadConfig(output=str(tmp_path / "h.safetensors"), run=run, labels=str(nolabel)), log=print)
    with pytest.raises(ConfigError, match="RUN and LABELS are required"):
        FitHeadConfig(output="h").validate()
    assert not os.path.exists(tmp_path / "h.safetensors")


def test_label_folders_become_labelled_shards(tmp_path):
    from PIL import Image

    from shardsmith.pipelines.formats.labels import folders_to_shards, labels_from_shards

    for label, n in (("0", 2), ("1", 3)):
        os.makedirs(tmp_path / "imgs" / label)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "imgs" / label / f"im{i}.png")
    (tmp_path / "imgs" / "1" / "notes.txt").write_text("not an image")
    urls = folders_to_shards(str(tmp_path / "imgs"), str(tmp_path / "shards"), per_shard=4)
    assert len(urls) == 2
    labels = labels_from_shards(urls, "label")
    assert sorted(labels.values()) == [0, 0, 1, 1, 1] and len(set(labels)) == 5
    os.makedirs(tmp_path / "bad" / "cats")
    Image.new("RGB", (8, 8)).save(tmp_path / "bad" / "cats" / "a.png")
    with pytest.raises(InputError, match="folder 'cats' is not a label"):
        folders_to_shards(str(tmp_path / "bad"), str(tmp_path / "s2"))


def test_make_watermark_data_then_fit_head_on_images(ray_local, tiny_models, sample, tmp_path):
    from shardsmith.jobs.make_watermark_data import make_watermark_data

    out = tmp_path / "wm"
    s1 = make_watermark_data(sample["images"] + "/00000.tar", str(out), per_shard=5, max_side=160, limit=10,
                             skip_if="sample_watermarked", log=lambda *a: None)
    assert s1["images"] == 10 and s1["samples"] == 20 and s1["shards"] == 2
    assert s1["skipped"]  # the sample's broken and already watermarked images
    labels = pq.read_table(out / "labels.parquet").to_pylist()
    assert sorted(r["label"] for r in labels) == [0] * 10 + [1] * 10
    assert len({r["group"] for r in labels}) == 10
    first = open(out / "00000.tar", "rb").read()
    make_watermark_data(sample["images"] + "/00000.tar", str(tmp_path / "wm2"), per_shard=5, max_side=160, limit=10,
                        skip_if="sample_watermarked", log=lambda *a: None)
    assert open(tmp_path / "wm2" / "00000.tar", "rb").read() == first  # same arguments, same bytes
    head = tmp_path / "pwm.safetensors"
    assert cli(["fit-head", "--images", str(out), str(head), "--folds", "2", "--clip-model",
                tiny_models["clip_model"], "--clip-pretrained", tiny_models["clip_pretrained"], "--batch-size", "8",
                "--quiet"]) == 0
    card = json.load(open(str(head) + ".json"))
    assert card["data"]["rows"] == 20 and card["data"]["positives"] == 10 and 0 <= card["metrics"]["auc"] <= 1
    assert card["data"]["groups"] == 10  # each pair kept in one fold
    assert card["clip"] == "tiny-clip/tiny-clip.pt"
    assert os.path.exists(str(head) + ".embeddings/curate/manifest.json")
