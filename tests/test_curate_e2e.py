"""End-to-end curate runs on a real local Ray with tiny models."""

import glob
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import curate_config, read_scores
from PIL import Image

from shardsmith.errors import RunError
from shardsmith.pipelines.config import ConfigError
from shardsmith.pipelines.flows.curate import run_curate


@pytest.fixture(scope="module")
def first_run(ray_local, tiny_models, sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    stats = run_curate(curate_config(sample["images"], out, tiny_models, embeddings=True), log=lambda *a: None)
    return out, stats


def test_every_row_is_accounted_for(first_run, sample):
    out, stats = first_run
    scores = read_scores(out)
    assert stats["rows_read"] == scores.num_rows == sample["rows"]
    assert stats["kept"] + stats["dropped"] + stats["errors"] == stats["rows_read"]
    for name, s in stats["shards"].items():
        t = pq.read_table(os.path.join(out, "scores", f"{name}.parquet"))
        status = t.column("status").to_pylist()
        assert s["rows_read"] == t.num_rows
        assert (s["kept"], s["dropped"], s["errors"]) == (status.count("kept"), status.count("dropped"),
                                                            status.count("error"))
        assert s["kept"] + s["dropped"] + s["errors"] == s["rows_read"]
        assert t.column("row").to_pylist() == list(range(t.num_rows))
    on_disk = json.load(open(os.path.join(out, "stats.json")))
    assert on_disk["rows_read"] == stats["rows_read"] and on_disk["kept"] == stats["kept"]
    assert sum(on_disk["dropped_by_reason"].values()) == on_disk["dropped"]
    assert set(on_disk["dropped_by_reason"]) <= {"aesthetic>=5", "pwatermark<0.8", "punsafe<0.5"}


def test_broken_samples_are_error_rows_with_specific_messages(first_run):
    out, stats = first_run
    t = read_scores(out).to_pylist()
    errors = {r["key"]: r for r in t if r["status"] == "error"}
    # every shard has: random bytes, a truncated JPEG, a sample with no image (see jobs/sample_data.py)
    assert stats["errors_by_kind"] == {"decode_error": 6, "missing_image": 3}
    assert any("truncated" in r["error"] for r in errors.values())
    assert any("not a recognised image format" in r["error"] for r in errors.values())
    assert all(r["aesthetic"] is None for r in errors.values())
    kept = [r for r in t if r["status"] == "kept"]
    assert kept and all(r["aesthetic"] >= 5 and r["pwatermark"] < 0.8 and r["punsafe"] < 0.5 for r in kept)
    dropped = [r for r in t if r["status"] == "dropped"]
    assert dropped and all(r["reason"] for r in dropped)


def test_scores_equal_a_reference_computation(first_run, tiny_models, sample):
    """open_clip's own preprocess + encode_image, normalised, through the reference MLP."""
    import open_clip
    from test_heads import ReferenceMLP

    out, _ = first_run
    open_clip.add_model_config(tiny_models["clip_model"])
    name = os.path.basename(tiny_models["clip_model"])[:-5]
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tiny_models["clip_pretrained"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    sd = torch.load(tiny_models["aesthetic_head"], weights_only=True)
    mlp = ReferenceMLP(sd["layers.0.weight"].shape[1]).eval()
    mlp.load_state_dict(sd)
    scores = {r["key"]: r for r in read_scores(out).to_pylist()}
    checked = 0
    with tarfile.open(sample["shards"][1]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name_, data in sorted(members.items()):
        key, ext = name_.split(".", 1)
        if ext not in ("jpg", "png", "webp") or scores[key]["status"] == "error":
            continue
        with torch.no_grad():
            x = preprocess(Image.open(io.BytesIO(data))).unsqueeze(0)
            emb = model.encode_image(x)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            ref = float(mlp(emb))
            txt = model.encode_text(tokenizer([members[f"{key}.txt"].decode()]))
            sim = float((emb * (txt / txt.norm(dim=-1, keepdim=True))).sum())
        assert abs(scores[key]["aesthetic"] - ref) < 1e-4, key
        assert abs(scores[key]["similarity"] - sim) < 1e-4, key
        checked += 1
    assert checked >= 15


def test_curated_shards_hold_the_kept_samples_untouched(first_run, sample):
    out, stats = first_run
    for src in sample["shards"]:
        name = os.path.basename(src)[:-4]
        scores = pq.read_table(os.path.join(out, "scores", f"{name}.parquet")).to_pylist()
        kept = [r["key"] for r in scores if r["status"] == "kept"]
        with tarfile.open(src) as a, tarfile.open(os.path.join(out, "curated", f"{name}.tar")) as b:
            orig = {m.name: a.extractfile(m).read() for m in a.getmembers()}
            cur = {m.name: b.extractfile(m).read() for m in b.getmembers()}
        assert sorted({n.split(".")[0] for n in cur}) == sorted(kept)
        for n, data in cur.items():
            assert orig[n] == data
        idx = pq.read_table(os.path.join(out, "curated", f"{name}.parquet"))
        assert idx.column("key").to_pylist() == kept
        assert {"url", "caption", "sha256", "aesthetic", "pwatermark", "punsafe", "similarity"} <= set(idx.column_names)


def test_embeddings_in_clip_retrieval_layout(first_run, tiny_models):
    out, stats = first_run
    emb = np.load(os.path.join(out, "img_emb", "img_emb_00000.npy"))
    meta = pq.read_table(os.path.join(out, "metadata", "metadata_00000.parquet"))
    assert emb.dtype == np.float16 and emb.shape == (meta.num_rows, tiny_models["embed_dim"])
    assert meta.num_rows == stats["shards"]["00000"]["rows_read"] - stats["shards"]["00000"]["errors"]
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_no_temporary_files_left(first_run):
    out, _ = first_run
    leftovers = [p for p in glob.glob(os.path.join(out, "**", "*"), recursive=True) if ".tmp-" in p]
    assert leftovers == [] and not os.path.exists(os.path.join(out, "_tmp"))


def test_resume_skips_committed_shards_and_ends_identical(first_run, tiny_models, sample, tmp_path):
    out, stats = first_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    # Simulate a run killed after two shards: shard 00001 has no ledger entry, a stale temp file
    # and a half-written curated tar under a temporary name.
    os.remove(copy / "_ledger" / "00001.json")
    os.remove(copy / "scores" / "00001.parquet")
    os.makedirs(copy / "_tmp", exist_ok=True)
    (copy / "_tmp" / ".tmp-abc-00001.tar").write_bytes(b"partial")
    before = {n: json.load(open(copy / "_ledger" / f"{n}.json"))["committed_at"] for n in ("00000", "00002")}
    logs = []
    again = run_curate(curate_config(sample["images"], copy, tiny_models, embeddings=True), log=logs.append)
    assert "2 already committed, 1 to do" in logs[0]
    after = {n: json.load(open(copy / "_ledger" / f"{n}.json"))["committed_at"] for n in ("00000", "00002")}
    assert before == after  # not redone
    assert not os.path.exists(copy / "_tmp")
    for sub in ("scores", "curated"):
        for f in sorted(os.listdir(os.path.join(out, sub))):
            if f.endswith(".parquet"):
                assert pq.read_table(os.path.join(out, sub, f)).equals(pq.read_table(copy / sub / f)), f
            else:
                assert open(os.path.join(out, sub, f), "rb").read() == open(copy / sub / f, "rb").read(), f
    assert {k: again[k] for k in ("rows_read", "kept", "dropped", "errors")} == \
        {k: stats[k] for k in ("rows_read", "kept", "dropped", "errors")}


def test_rerun_with_other_settings_is_refused_unless_overwrite(first_run, tiny_models, sample, tmp_path):
    out, _ = first_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    with pytest.raises(RunError, match="rules differ"):
        run_curate(curate_config(sample["images"], copy, tiny_models, embeddings=True,
                                 preset="sd-improved-aesthetics"), log=lambda *a: None)
    stats = run_curate(curate_config(sample["images"], copy, tiny_models, embeddings=True,
                                     preset="sd-improved-aesthetics", overwrite=True), log=lambda *a: None)
    assert set(stats["dropped_by_reason"]) <= {"min_side>=512", "aesthetic>5", "pwatermark<0.5"}
    assert stats["dropped_by_reason"]["min_side>=512"] > 0  # the sample images are all < 512 px here


def test_rule_on_a_score_without_weights_is_rejected_before_work(tiny_models, sample, tmp_path):
    cfg = curate_config(sample["images"], tmp_path / "o", tiny_models, watermark_head=None)
    with pytest.raises(ConfigError, match="needs the 'pwatermark' score"):
        run_curate(cfg, log=lambda *a: None)
    assert not os.path.exists(tmp_path / "o")


def test_head_without_weights_is_a_null_column(ray_local, tiny_models, sample, tmp_path):
    cfg = curate_config(sample["shards"][0], tmp_path / "o", tiny_models, nsfw_head=None, watermark_head=None,
                        preset=None, rules=["aesthetic >= 5"])
    stats = run_curate(cfg, log=lambda *a: None)
    t = read_scores(tmp_path / "o")
    assert t.column("punsafe").null_count == t.num_rows and t.column("pwatermark").null_count == t.num_rows
    assert stats["scores_not_computed"] == ["pwatermark", "punsafe"]


def test_http_input_through_fsspec(ray_local, tiny_models, sample, tmp_path, first_run):
    """A non-local fsspec filesystem: shards served over HTTP on loopback."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):  # a subclass: the library's class is left as it is
        def log_message(self, *a):
            pass

    handler = functools.partial(Quiet, directory=sample["images"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{{00000,00002}}.tar"
        stats = run_curate(curate_config(url, tmp_path / "o", tiny_models, embeddings=True), log=lambda *a: None)
    finally:
        server.shutdown()
    local, _ = first_run
    for name in ("00000", "00002"):
        a = pq.read_table(os.path.join(local, "scores", f"{name}.parquet"))
        b = pq.read_table(tmp_path / "o" / "scores" / f"{name}.parquet")
        assert a.equals(b)
    assert stats["shards_committed"] == 2
