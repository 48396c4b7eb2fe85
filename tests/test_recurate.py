"""recurate: a finished run decided again from its stored scores and embeddings, with the CLIP
weights gone from the machine -- its decisions and curated shards equal a fresh curate's with the
same rules, new heads are within the stated fp16 bound of the full pipeline's values, RUN is
recorded as the parent, and a crash resumes."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import curate_config, read_scores

import shardsmith
from shardsmith.errors import ConfigError, InputError
from shardsmith.filters.heads import MLPHead, ProbabilityHead, load_head
from shardsmith.filters.stored import fp16_bound, fp16_error_norm, score_stored
from shardsmith.pipelines.config.recurate import RecurateConfig
from shardsmith.pipelines.flows.curate import run_curate
from shardsmith.pipelines.flows.recurate import run_recurate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_RULES = ["aesthetic >= 4.6", "pwatermark < 0.8"]  # RUN used laion-aesthetics-5plus
QUIET = dict(log=lambda *a: None)


def _save_heads(d):
    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 1)
    torch.save(lin.state_dict(), d / "cartoon.pth")
    prob = ProbabilityHead([64, 16, 1])
    torch.save(prob.state_dict(), d / "ptext.pth")
    torch.save(torch.nn.Linear(32, 1).state_dict(), d / "narrow.pth")
    return {"pcartoon": {"arch": "linear", "weights": str(d / "cartoon.pth")},
            "ptext": {"arch": "probability", "weights": str(d / "ptext.pth")}}, str(d / "narrow.pth")


@pytest.fixture(scope="module")
def runs(ray_local, tiny_models, sample, tmp_path_factory):
    """RUN (laion-aesthetics-5plus, --embeddings), FRESH (a curate with NEW_RULES whose full pipeline
    also computes the new heads), then the CLIP weights deleted and RUN re-curated into REC."""
    d = tmp_path_factory.mktemp("recurate")
    clip_dir = d / "clip"
    shutil.copytree(os.path.dirname(tiny_models["clip_model"]), clip_dir)
    models = {**tiny_models, "clip_model": str(clip_dir / "tiny-clip.json"),
              "clip_pretrained": str(clip_dir / "tiny-clip.pt")}
    heads, narrow = _save_heads(d)
    run_stats = run_curate(curate_config(sample["images"], d / "run", models, preset="laion-aesthetics-5plus",
                                         embeddings=True), **QUIET)
    fresh_stats = run_curate(curate_config(sample["images"], d / "fresh", models, preset=None, rules=NEW_RULES,
                                           heads=heads), **QUIET)
    os.remove(models["clip_pretrained"])  # recurate needs no CLIP model
    os.remove(models["clip_model"])
    rec_stats = run_recurate(RecurateConfig(run=str(d / "run"), output=str(d / "rec"), rules=list(NEW_RULES),
                                            heads=heads, progress=False), **QUIET)
    return {"dir": d, "run": d / "run", "fresh": d / "fresh", "rec": d / "rec", "heads": heads, "narrow": narrow,
            "run_stats": run_stats, "fresh_stats": fresh_stats, "rec_stats": rec_stats}


def _by_key(table):
    return {k: i for i, k in enumerate(table.column("key").to_pylist())}


def test_decisions_and_curated_shards_equal_a_fresh_curate(runs):
    rec, fresh = read_scores(runs["rec"]), read_scores(runs["fresh"])
    assert rec.num_rows == fresh.num_rows == runs["run_stats"]["rows_read"]
    for col in ("key", "row", "status", "reason", "error", "aesthetic", "pwatermark", "punsafe", "similarity",
                "original_width", "original_height", "caption", "url"):
        assert rec.column(col).to_pylist() == fresh.column(col).to_pylist(), col
    # the new rules changed the selection (else equality would prove little)
    assert runs["rec_stats"]["kept"] != runs["run_stats"]["kept"]
    for k in ("rows_read", "kept", "dropped", "dropped_by_reason", "errors", "errors_by_kind"):
        assert runs["rec_stats"][k] == runs["fresh_stats"][k], k
    for shard in sorted(os.listdir(runs["fresh"] / "curated")):
        if shard.endswith(".tar"):
            a, b = (runs["rec"] / "curated" / shard).read_bytes(), (runs["fresh"] / "curated" / shard).read_bytes()
            assert a == b, shard
        else:
            a, b = pq.read_table(runs["rec"] / "curated" / shard), pq.read_table(runs["fresh"] / "curated" / shard)
            assert a.column_names == b.column_names
            for c in a.column_names:
                if c not in runs["heads"]:
                    assert a.column(c).to_pylist() == b.column(c).to_pylist(), (shard, c)


def test_new_heads_are_within_the_fp16_bound_of_the_full_pipeline(runs):
    rec, fresh = read_scores(runs["rec"]), read_scores(runs["fresh"])
    manifest = json.loads((runs["rec"] / "manifest.json").read_text())
    assert set(manifest["models"]["computed"]) >= {"pcartoon", "ptext", "aesthetic"}
    for name in runs["heads"]:
        bound = manifest["models"]["heads_from_embeddings"][name]["fp16_bound"]
        assert 0 < bound < 1e-2, bound
        a = np.array(rec.column(name).to_pylist(), dtype=float)
        b = np.array(fresh.column(name).to_pylist(), dtype=float)
        assert np.array_equal(np.isnan(a), np.isnan(b)) and (~np.isnan(a)).sum() > 40
        err = np.abs(a - b)[~np.isnan(a)]
        assert err.max() <= bound + 1e-6, (name, err.max(), bound)
        assert err.max() > 0  # computed from the stored fp16 vectors, not the fp32 forward


def test_fp16_bound_holds_for_every_arch_on_random_embeddings():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((4000, 768)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    e[:, :8] *= 1e-3  # some tiny components: fp16 subnormals
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    stored = e.astype(np.float16)
    assert np.linalg.norm(stored.astype(np.float32) - e, axis=1).max() <= fp16_error_norm(768)
    torch.manual_seed(0)
    from shardsmith.filters.heads import AestheticMLP, LinearHead, NsfwHead

    for head in (LinearHead(768), AestheticMLP(768), NsfwHead(768), MLPHead([768, 64, 1]), ProbabilityHead([768, 1])):
        head.eval()
        with torch.no_grad():
            full = head(torch.from_numpy(e)).numpy().astype(np.float64)
        err = np.abs(score_stored(head, stored) - full).max()
        assert 0 < err <= fp16_bound(head), (type(head).__name__, err, fp16_bound(head))


def test_lineage_report_and_errors_kept(runs):
    manifest = json.loads((runs["rec"] / "manifest.json").read_text())
    parent = json.loads((runs["run"] / "manifest.json").read_text())
    assert manifest["tool"] == "shardsmith recurate"
    assert manifest["parent"]["run"] == str(runs["run"]) and manifest["parent"]["fingerprint"] == parent["fingerprint"]
    assert manifest["inputs"] == parent["inputs"]
    assert (runs["rec"] / "report.html").exists() and 'data-stat="kept"' in (runs["rec"] / "report.html").read_text()
    stats = json.loads((runs["rec"] / "stats.json").read_text())
    assert stats["parent"] == str(runs["run"]) and stats["rules"] == ["aesthetic>=4.6", "pwatermark<0.8"]
    before, after = read_scores(runs["run"]), read_scores(runs["rec"])
    errors = [i for i, s in enumerate(before.column("status").to_pylist()) if s == "error"]
    assert errors and runs["run_stats"]["errors_by_kind"] == runs["rec_stats"]["errors_by_kind"]
    for c in ("status", "reason", "error"):
        assert [after.column(c)[i].as_py() for i in errors] == [before.column(c)[i].as_py() for i in errors]


def test_without_rules_runs_own_rules_apply(runs, tmp_path):
    stats = shardsmith.recurate(str(runs["run"]), str(tmp_path / "same"), progress=False, report=False, **QUIET)
    assert read_scores(tmp_path / "same").column("status") == read_scores(runs["run"]).column("status")
    assert stats["rules"] == runs["run_stats"]["rules"]


def test_resume_after_a_crash_redoes_only_the_uncommitted_shard(runs, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(runs["rec"], out)
    ledger = {p: json.loads((out / "_ledger" / p).read_text())["committed_at"] for p in os.listdir(out / "_ledger")}
    # a crash while shard 00001 was being written: its ledger entry missing, a half-written tar, tmp litter
    os.remove(out / "_ledger" / "00001.json")
    data = (out / "curated" / "00001.tar").read_bytes()
    (out / "curated" / "00001.tar").write_bytes(data[: len(data) // 2])
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "00001.parquet.partial").write_bytes(b"half")
    cfg = RecurateConfig(run=str(runs["run"]), output=str(out), rules=list(NEW_RULES), heads=runs["heads"],
                         progress=False)
    stats = run_recurate(cfg, **QUIET)
    assert stats["kept"] == runs["rec_stats"]["kept"]
    now = {p: json.loads((out / "_ledger" / p).read_text())["committed_at"] for p in os.listdir(out / "_ledger")}
    assert now["00000.json"] == ledger["00000.json"] and now["00002.json"] == ledger["00002.json"]
    assert now["00001.json"] > ledger["00001.json"]
    for sub in ("curated", "scores"):
        for f in os.listdir(runs["rec"] / sub):
            assert (out / sub / f).read_bytes() == (runs["rec"] / sub / f).read_bytes(), f
    assert not os.path.exists(out / "_tmp")
    with pytest.raises(Exception, match="other settings"):  # a resume may not change the rules
        run_recurate(RecurateConfig(run=str(runs["run"]), output=str(out), rules=["aesthetic >= 7"],
                                    progress=False), **QUIET)


@pytest.fixture(scope="module")
def plain_run(ray_local, tiny_models, sample, tmp_path_factory):
    """A one-shard curate run without --embeddings, on a copy of one input shard."""
    d = tmp_path_factory.mktemp("plain")
    (d / "in").mkdir()
    shutil.copy(sample["shards"][0], d / "in" / "00000.tar")
    run_curate(curate_config(d / "in", d / "run", tiny_models, preset="none", nsfw_head=None), **QUIET)
    meta = d / "meta-run"
    run_curate(curate_config(sample["metadata"], meta, tiny_models, preset="laion-aesthetics-5plus"), **QUIET)
    return d


def _cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    r = subprocess.run([sys.executable, "-m", "shardsmith", "recurate", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, env=env, timeout=180)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("shardsmith recurate: error: ")
    return lines[0]


def test_one_line_errors(runs, plain_run, tmp_path):
    d = plain_run
    # as a user sees them: exit code 2, one line
    assert "has no embeddings" in _cli(d / "run", tmp_path / "o1", "--head", f"pcartoon=linear:{runs['dir']}/cartoon.pth",
                                       cwd=tmp_path)
    assert "expects 32-d embeddings but the CLIP model gives 64-d" in _cli(
        runs["run"], tmp_path / "o2", "--head", f"narrow=linear:{runs['narrow']}", cwd=tmp_path)

    def error(run, **kw):  # the same errors through the API (tests/test_api.py: same messages)
        with pytest.raises(shardsmith.ShardsmithError) as e:
            shardsmith.recurate(str(run), str(tmp_path / "o"), **kw, **QUIET)
        return str(e.value)

    assert "unknown field 'pcartoon' (a new score: --head pcartoon=" in error(runs["run"], rules=["pcartoon < 0.5"])
    assert "needs the 'punsafe' score, which" in error(d / "run", rules=["punsafe < 0.5"])
    assert "metadata-mode run" in error(d / "meta-run")
    assert "no manifest.json" in error(tmp_path / "nothing")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(d / "run", unfinished)
    os.remove(unfinished / "_ledger" / "00000.json")
    assert "0 of 1 shards are committed" in error(unfinished)
    gone = tmp_path / "gone"
    shutil.copytree(d, gone)
    with open(gone / "run" / "manifest.json") as f:
        m = json.load(f)
    m["inputs"][0]["url"] = str(gone / "in" / "00000.tar")
    (gone / "run" / "manifest.json").write_text(json.dumps(m))
    shutil.copy(runs["dir"] / "narrow.pth", gone / "in" / "00000.tar")  # something else under its name
    assert "has changed since RUN" in error(gone / "run")  # found by the shard's task: still one line
    os.remove(gone / "in" / "00000.tar")
    assert "is no longer readable" in error(gone / "run")


def test_api_raises_the_cli_errors(runs, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'rulez'"):
        shardsmith.recurate(str(runs["run"]), str(tmp_path / "x"), config={"rulez": []})
    with pytest.raises(InputError, match="no manifest.json"):
        shardsmith.recurate(str(tmp_path / "none"), str(tmp_path / "x"), **QUIET)
    with pytest.raises(ConfigError, match="is RUN itself"):
        shardsmith.recurate(str(runs["run"]), str(runs["run"]))


def test_head_weights_load_through_the_registry_loader(runs):
    head = load_head("pcartoon", runs["heads"]["pcartoon"]["weights"], embed_dim=64, arch="linear")
    assert fp16_bound(head) == pytest.approx(float(torch.linalg.norm(head.linear.weight.detach())) * fp16_error_norm(64))


@pytest.fixture(scope="module")
def indexed_input(sample, tmp_path_factory):
    """Shard 00000 with a shardsmith download index (img2dataset's columns + reason, the download
    marker): its first rows have no sample -- one skipped by a metadata rule, one failed -- so row
    numbers are index positions, not tar positions."""
    import pyarrow as pa

    from shardsmith.pipelines.formats.img2dataset import META_KEY

    d = tmp_path_factory.mktemp("indexed")
    shutil.copy(sample["shards"][0], d / "00000.tar")
    index = pq.read_table(sample["shards"][0][:-4] + ".parquet")
    index = index.cast(pa.schema([pa.field(f.name, pa.string() if pa.types.is_null(f.type) else f.type)
                                  for f in index.schema]))
    extra = pa.Table.from_pylist([
        {"key": "skipped01", "url": "https://x.example/s.jpg", "caption": "skipped", "status": "skipped",
         "error_message": None, "width": None, "height": None, "original_width": 600, "original_height": 600,
         "exif": None, "sha256": None},
        {"key": "failed01", "url": "https://x.example/f.jpg", "caption": "failed", "status": "failed_to_download",
         "error_message": "HTTP Error 404: Not Found", "width": None, "height": None, "original_width": None,
         "original_height": None, "exif": None, "sha256": None}], schema=index.schema)
    table = pa.concat_tables([extra, index])
    table = table.append_column("reason", pa.array(["aesthetic>=9"] + [None] * (table.num_rows - 1), pa.string()))
    pq.write_table(table.replace_schema_metadata({META_KEY: b"{}"}), d / "00000.parquet")
    return d


def test_an_indexed_run_with_rows_without_samples(ray_local, tiny_models, indexed_input, tmp_path):
    run_curate(curate_config(indexed_input, tmp_path / "run", tiny_models, preset="laion-aesthetics-5plus",
                             embeddings=True), **QUIET)
    run_curate(curate_config(indexed_input, tmp_path / "fresh", tiny_models, preset=None, rules=NEW_RULES), **QUIET)
    run_recurate(RecurateConfig(run=str(tmp_path / "run"), output=str(tmp_path / "rec"), rules=list(NEW_RULES),
                                progress=False, report=False), **QUIET)
    rec, fresh = read_scores(tmp_path / "rec"), read_scores(tmp_path / "fresh")
    assert rec.column("row").to_pylist()[:2] == [0, 1]  # the index's positions
    for col in ("key", "row", "status", "reason", "error"):
        assert rec.column(col).to_pylist() == fresh.column(col).to_pylist(), col
    by_key = dict(zip(rec.column("key").to_pylist(), zip(rec.column("status").to_pylist(),
                                                           rec.column("reason").to_pylist())))
    assert by_key["skipped01"] == ("dropped", "aesthetic>=9") and by_key["failed01"] == ("error", "http_404")
    for f in ("00000.tar", "00000.parquet"):
        a, b = tmp_path / "rec" / "curated" / f, tmp_path / "fresh" / "curated" / f
        assert (a.read_bytes() == b.read_bytes()) if f.endswith(".tar") else \
            pq.read_table(a).to_pylist() == pq.read_table(b).to_pylist()


def test_a_recurate_of_a_recurate_finds_the_embeddings_through_its_parent(runs, tmp_path):
    heads = {"pcartoon2": runs["heads"]["pcartoon"]}
    stats = shardsmith.recurate(str(runs["rec"]), str(tmp_path / "again"), heads=heads, progress=False, report=False,
                                **QUIET)
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["parent"]["run"] == str(runs["rec"]) and manifest["parent"]["embeddings"] == str(runs["run"])
    again, rec = read_scores(tmp_path / "again"), read_scores(runs["rec"])
    assert again.column("pcartoon2").to_pylist() == rec.column("pcartoon").to_pylist()
    assert again.column("status") == rec.column("status") and stats["rules"] == runs["rec_stats"]["rules"]
