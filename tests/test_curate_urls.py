"""curate --mode urls end to end: LAION metadata of loopback URLs -> fetched, scored, filtered,
every row accounted for; compared with a curate run over the same files read from disk."""

import io
import json
import os
import tarfile
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import curate_config, read_scores
from image_server import ImageServer
from PIL import Image

from shardsmith.pipelines.config import ConfigError
from shardsmith.pipelines.flows.curate import run_curate

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]
QUIET = dict(log=lambda *a: None)
FETCH = dict(mode="urls", fetch_timeout=2.0, fetch_deadline=4.0, fetch_retries=1, fetch_max_bytes=2_000_000,
             fetch_threads=8, allow_private_addresses=True)  # the site is a loopback server


def tar_samples(path: str) -> dict[str, dict]:
    """key -> {ext: bytes} of a webdataset tar."""
    out: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def image_ext(members: dict) -> str | None:
    return next((e for e in ("jpg", "png", "webp") if e in members), None)


def jpeg(size=(64, 48), color=(20, 120, 220)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def site(sample):
    """The sample's shard 00000 served over HTTP, plus URLs that misbehave in every defined way.
    Returns (server, metadata rows, expected outcome per URL path, flag that heals two URLs)."""
    samples = tar_samples(sample["shards"][0])
    heal = threading.Event()
    server = ImageServer()
    rows, expect = [], {}

    def row(path, caption, w=64, h=48, punsafe=0.1):
        rows.append({"URL": server.url(path) if path else None, "TEXT": caption, "WIDTH": w, "HEIGHT": h,
                     "punsafe": punsafe})

    for key, members in sorted(samples.items()):
        ext = image_ext(members)
        meta = json.loads(members["json"])
        path = f"/img/{key}.{ext or 'jpg'}"
        if ext:
            server.add(path, "ok", members[ext])
        expect[path] = key  # the image-less sample's URL is a 404: not registered
        row(path, members["txt"].decode(), meta["width"], meta["height"])
    other = tar_samples(sample["shards"][1])
    good = [k for k in sorted(other) if image_ext(other[k]) == "jpg"][:3]
    misbehaving = [
        ("/e/gone.jpg", ("status", {"status": 404}), "http_404"),
        ("/e/flaky.jpg", ("fail_first", {"status": 500}), "ok"),  # 500 then 200
        ("/e/busy.jpg", ("fail_first", {"status": 429, "headers": {"Retry-After": "1"}}), "ok"),
        ("/e/slow.jpg", ("slow", {"delay": 8.0}), "timeout"),
        ("/e/loop-a", ("redirect", {"to": "/e/loop-b"}), "redirect_loop"),
        ("/e/page.jpg", ("ok", {"ctype": "text/html"}), "not_an_image"),
        ("/e/endless.jpg", ("endless", {}), "too_large"),
        ("/e/noai.jpg", ("ok", {"headers": {"X-Robots-Tag": "noai"}}), "opted_out"),
        ("/e/down-until-retry.jpg", ("switch", {"flag": heal, "before": None}), "http_5xx"),
        ("/e/slow-until-retry.jpg", ("switch", {"flag": heal, "before": None}), "timeout"),
    ]
    server.add("/e/loop-b", "redirect", to="/e/loop-a")
    from image_server import Route

    for i, (path, (kind, opts), outcome) in enumerate(misbehaving):
        body = b"<!DOCTYPE html><html>nope</html>" if path == "/e/page.jpg" else other[good[i % 3]]["jpg"]
        if kind == "switch":
            before = Route("status", status=503) if "down" in path else Route("slow", delay=8.0)
            opts = {"flag": heal, "before": before}
        server.add(path, kind, body, **opts)
        expect[path] = outcome
        row(path, other[good[i % 3]]["txt"].decode())
    server.add("/e/unsafe.jpg", "ok", jpeg())
    row("/e/unsafe.jpg", "a photo", punsafe=0.99)  # the metadata rejects it: never fetched
    expect["/e/unsafe.jpg"] = "skipped"
    row(None, "no url at all")
    yield {"server": server, "rows": rows, "expect": expect, "heal": heal, "samples": samples,
           "other": {k: other[k] for k in good}}
    server.close()
    assert not server.thread.is_alive()


@pytest.fixture(scope="module")
def local_run(ray_local, tiny_models, sample, tmp_path_factory):
    """The reference: curate of the same shard read from disk."""
    out = tmp_path_factory.mktemp("local") / "out"
    run_curate(curate_config(sample["shards"][0], out, tiny_models), **QUIET)
    return {r["key"]: r for r in read_scores(out).to_pylist()}


@pytest.fixture(scope="module")
def url_run(ray_local, tiny_models, site, tmp_path_factory):
    d = tmp_path_factory.mktemp("urls")
    pq.write_table(pa.Table.from_pylist(site["rows"]), d / "00000.parquet")
    out = d / "out"
    site["server"].reset_counts()
    stats = run_curate(curate_config(d / "00000.parquet", out, tiny_models, **FETCH), **QUIET)
    counts = dict(site["server"].counts)
    return {"dir": d, "out": out, "stats": stats, "scores": read_scores(out).to_pylist(), "counts": counts}


def path_of(url: str | None) -> str | None:
    return "/" + url.split("/", 3)[3] if url else None


def test_every_row_ends_with_its_defined_status(url_run, site):
    scores, stats = url_run["scores"], url_run["stats"]
    assert len(scores) == len(site["rows"]) == stats["rows_read"]
    assert [r["row"] for r in scores] == list(range(len(scores)))  # input order, once each
    assert [r["url"] for r in scores] == [r["URL"] for r in site["rows"]]
    assert stats["kept"] + stats["dropped"] + stats["errors"] == stats["rows_read"]
    by_path = {path_of(r["url"]): r for r in scores}
    for path, outcome in site["expect"].items():
        r = by_path[path]
        if outcome == "skipped":
            assert (r["status"], r["reason"]) == ("dropped", "punsafe<0.5"), r
        elif outcome in ("ok",) or outcome in site["samples"]:
            if outcome in site["samples"] and image_ext(site["samples"][outcome]) is None:
                assert (r["status"], r["reason"]) == ("error", "http_404"), r
            elif r["status"] == "error":  # the sample's own broken images: fetched, not an image
                assert r["reason"] == "not_an_image", r
            else:
                assert r["status"] in ("kept", "dropped") and r["aesthetic"] is not None, r
        else:
            assert (r["status"], r["reason"]) == ("error", outcome), (path, r)
            assert r["error"], r
    assert by_path[None]["reason"] == "bad_url"
    kinds = stats["errors_by_kind"]
    for k in ("http_404", "http_5xx", "timeout", "redirect_loop", "not_an_image", "too_large", "opted_out",
              "bad_url"):
        assert kinds.get(k), (k, kinds)
    assert kinds["timeout"] == 2 and kinds["http_404"] == 2 and kinds["not_an_image"] == 3


def test_metadata_rules_run_before_any_fetch(url_run):
    assert url_run["counts"].get("/e/unsafe.jpg", 0) == 0
    assert url_run["counts"]["/e/flaky.jpg"] == 2 and url_run["counts"]["/e/busy.jpg"] == 2
    assert url_run["counts"]["/e/gone.jpg"] == 1  # 4xx: never retried


def test_fetched_images_score_exactly_like_the_same_files_from_disk(url_run, local_run, site):
    compared = 0
    for r in url_run["scores"]:
        key = site["expect"].get(path_of(r["url"]))
        if key not in local_run:
            continue
        ref = local_run[key]
        if ref["status"] == "error":  # local: decode_error / missing_image; urls: not_an_image / http_404
            assert r["status"] == "error"
            continue
        for c in ("status", "reason", "aesthetic", "pwatermark", "punsafe", "similarity", "original_width",
                  "original_height", "caption"):
            assert r[c] == ref[c], (key, c, r[c], ref[c])
        compared += 1
    assert compared >= 15


def test_downloaded_shard_is_img2dataset_layout(url_run, site):
    d = url_run["out"] / "downloaded"
    index = pq.read_table(d / "00000.parquet")
    for c in ("key", "url", "caption", "status", "error_message", "width", "height", "original_width",
              "original_height", "exif", "sha256"):
        assert c in index.column_names, c
    assert index.num_rows == len(site["rows"])
    assert set(index.column("status").to_pylist()) == {"success", "skipped", "failed_to_download"}
    members = tar_samples(str(d / "00000.tar"))
    ok = [r for r in index.to_pylist() if r["status"] == "success"]
    assert sorted(members) == sorted(r["key"] for r in ok)
    import hashlib

    served = {path_of(r["url"]): r for r in ok}
    for path, r in served.items():
        m = members[r["key"]]
        ext = image_ext(m)
        assert hashlib.sha256(m[ext]).hexdigest() == r["sha256"]  # stored untouched (no resize)
        assert m["txt"].decode() == r["caption"]
        meta = json.loads(m["json"])
        assert meta["url"] == r["url"] and meta["status"] == "success" and meta["width"] == r["width"]
    failed = [r for r in index.to_pylist() if r["status"] == "failed_to_download"]
    assert all(r["error_message"] and r["reason"] for r in failed)


def test_curated_shard_and_a_later_images_run_read_the_outputs(url_run, tiny_models, tmp_path):
    out = url_run["out"]
    kept = [r["key"] for r in url_run["scores"] if r["status"] == "kept"]
    assert sorted(tar_samples(str(out / "curated" / "00000.tar"))) == sorted(kept)
    # The downloaded shard is an ordinary input: every row accounted for the same way.
    again = run_curate(curate_config(out / "downloaded", tmp_path / "o", tiny_models), **QUIET)
    assert again["mode"] == "images"
    for k in ("rows_read", "kept", "dropped", "errors", "errors_by_kind", "dropped_by_reason"):
        assert again[k] == url_run["stats"][k], k
    assert read_scores(tmp_path / "o").equals(read_scores(out))


def test_rerun_resumes_without_fetching(url_run, tiny_models, site):
    site["server"].reset_counts()
    logs = []
    stats = run_curate(curate_config(url_run["dir"] / "00000.parquet", url_run["out"], tiny_models, **FETCH),
                       log=logs.append)
    assert "1 already committed, 0 to do" in logs[0]
    assert sum(site["server"].counts.values()) == 0 and stats["rows_read"] == url_run["stats"]["rows_read"]


def test_retry_failed_fetches_only_the_retryable_failures(url_run, tiny_models, site, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(url_run["out"], out)
    before = {path_of(r["url"]): r for r in url_run["scores"]}
    retryable = {p for p, r in before.items() if r["status"] == "error" and r["reason"] in
                 ("timeout", "connection_error", "http_5xx", "http_429")}
    assert retryable == {"/e/slow.jpg", "/e/down-until-retry.jpg", "/e/slow-until-retry.jpg"}
    site["heal"].set()
    site["server"].reset_counts()
    try:
        logs = []
        stats = run_curate(curate_config(url_run["dir"] / "00000.parquet", out, tiny_models, retry_failed=True,
                                         **FETCH), log=logs.append)
    finally:
        site["heal"].clear()
    assert "1 committed with failures to retry" in logs[0]
    assert set(site["server"].counts) == retryable  # nothing else was requested again
    assert all(n == 1 for n in site["server"].counts.values())
    after = {path_of(r["url"]): r for r in read_scores(out).to_pylist()}
    for p in ("/e/down-until-retry.jpg", "/e/slow-until-retry.jpg"):
        assert after[p]["status"] in ("kept", "dropped") and after[p]["aesthetic"] is not None, after[p]
    assert after["/e/slow.jpg"]["reason"] == "timeout"
    for p, r in before.items():  # everything else as it was
        if p not in retryable:
            assert after[p] == r, p
    old = url_run["stats"]
    assert stats["errors"] == old["errors"] - 2 and stats["rows_read"] == old["rows_read"]
    assert stats["errors_by_kind"]["timeout"] == 1 and "http_5xx" not in stats["errors_by_kind"]
    assert stats["kept"] + stats["dropped"] + stats["errors"] == stats["rows_read"]
    on_disk = json.load(open(out / "stats.json"))
    assert on_disk["errors_by_kind"] == stats["errors_by_kind"]


def test_resize_at_download_keeps_the_original_size(ray_local, tiny_models, site, tmp_path):
    def size(k):
        return Image.open(io.BytesIO(site["samples"][k]["jpg"])).size

    keys = [k for k in sorted(site["samples"]) if image_ext(site["samples"][k]) == "jpg"
            and json.loads(site["samples"][k]["json"])["sample_broken"] is None and max(size(k)) > 64][:8]
    rows = [{"URL": site["server"].url(f"/img/{k}.jpg"), "TEXT": site["samples"][k]["txt"].decode()} for k in keys]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    cfg = curate_config(tmp_path / "m.parquet", tmp_path / "o", tiny_models, preset=None,
                        rules=["min_side >= 90"], resize_max_side=64, **FETCH)
    stats = run_curate(cfg, **QUIET)
    sizes = {k: Image.open(io.BytesIO(site["samples"][k]["jpg"])).size for k in keys}
    scores = read_scores(tmp_path / "o").to_pylist()
    for k, r in zip(keys, scores):
        assert (r["original_width"], r["original_height"]) == sizes[k]
        assert r["status"] == ("kept" if min(sizes[k]) >= 90 else "dropped")
    assert stats["kept"] >= 1
    stored = tar_samples(str(tmp_path / "o" / "downloaded" / "m.tar"))
    for m in stored.values():
        assert max(Image.open(io.BytesIO(m["jpg"])).size) <= 64
        meta = json.loads(m["json"])
        assert max(meta["width"], meta["height"]) <= 64 < max(meta["original_width"], meta["original_height"])


def test_download_command_writes_img2dataset_shards(ray_local, site, tmp_path):
    from shardsmith.jobs.cli import main

    good = [r for r in site["rows"][:20] if site["expect"][path_of(r["URL"])] in site["samples"]][:2]
    bad = [r for r in site["rows"] if path_of(r["URL"]) in (None, "/e/gone.jpg", "/e/noai.jpg", "/e/unsafe.jpg")]
    rows = good + bad
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-00007.parquet")
    out = tmp_path / "dl"
    code = main(["download", str(tmp_path / "part-00007.parquet"), str(out), "--rule", "punsafe < 0.5",
                 "--fetch-timeout", "1", "--fetch-deadline", "3", "--fetch-retries", "0", "--quiet",
                 "--allow-private-addresses"])
    assert code == 0
    index = pq.read_table(out / "part-00007.parquet").to_pylist()
    assert len(index) == 6 and os.path.exists(out / "part-00007.tar")
    stats = json.load(open(out / "stats.json"))
    assert stats["rows_read"] == 6 and stats["dropped_by_reason"] == {"punsafe<0.5": 1}
    assert stats["kept"] == sum(r["status"] == "success" for r in index)


def test_urls_options_are_validated(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="retry_failed: only applies to mode urls"):
        curate_config("x", "y", tiny_models, retry_failed=True).validate()
    with pytest.raises(ConfigError, match="retry_kinds: 'sometimes'"):
        curate_config("x", "y", tiny_models, mode="urls", retry_kinds=["sometimes"]).validate()
    with pytest.raises(ConfigError, match="opted_out is never retried"):
        curate_config("x", "y", tiny_models, mode="urls", retry_kinds=["opted_out"]).validate()
    with pytest.raises(ConfigError, match="fetch_threads"):
        curate_config("x", "y", tiny_models, mode="urls", fetch_threads=0).validate()


# -- the download step and the index merge, without Ray ------------------------------------------

def test_large_metadata_files_are_cut_into_shards_that_read_their_own_rows(tmp_path):
    from shardsmith.pipelines.formats.inputs import plan_url_shards, sample_key
    from shardsmith.pipelines.stages.download import read_metadata_rows

    t = pa.table({"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(7)], "TEXT": [f"c{i}" for i in range(7)]})
    pq.write_table(t, tmp_path / "part-00003.parquet", row_group_size=2)
    shards = plan_url_shards(str(tmp_path / "part-00003.parquet"), per_shard=3)
    assert [(s.name, s.start, s.stop) for s in shards] == [
        ("part-00003_00000", 0, 3), ("part-00003_00001", 3, 6), ("part-00003_00002", 6, 7)]
    meta, available = read_metadata_rows(shards[1])
    assert meta.column("caption").to_pylist() == ["c3", "c4", "c5"] and meta.column("row").to_pylist() == [3, 4, 5]
    assert available == {"url", "caption"}
    assert sample_key(shards[1], 2, 3) == "part-00003_00001_0002"
    one = plan_url_shards(str(tmp_path / "part-00003.parquet"), per_shard=10)
    assert [(s.name, s.start, s.stop) for s in one] == [("part-00003", 0, 7)]


def test_metadata_without_url_column_is_refused_before_work(tmp_path):
    from shardsmith.pipelines.formats.inputs import InputError, plan_url_shards

    pq.write_table(pa.table({"TEXT": ["a"]}), tmp_path / "m.parquet")
    with pytest.raises(InputError, match="missing column 'URL'"):
        plan_url_shards(str(tmp_path / "m.parquet"), 100)


def test_a_half_replaced_download_is_detected_and_fetched_again(site, tmp_path):
    from shardsmith.filters.rules import RuleSet
    from shardsmith.pipelines.formats.fetch import FetchOptions
    from shardsmith.pipelines.formats.inputs import plan_url_shards
    from shardsmith.pipelines.stages.download import DownloadOptions, download_shard, read_download

    keys = [k for k in sorted(site["samples"]) if image_ext(site["samples"][k]) == "png"][:1] + \
        [k for k in sorted(site["samples"]) if image_ext(site["samples"][k]) == "jpg"][:2]
    rows = [{"URL": site["server"].url(f"/img/{k}.{image_ext(site['samples'][k])}"), "TEXT": "x"} for k in keys]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    shard = plan_url_shards(str(tmp_path / "m.parquet"), 100)[0]
    opts = DownloadOptions(FetchOptions(connect_timeout=2, read_timeout=2, deadline=4, allow_private_addresses=True),
                           threads=2)
    dest, tmp = str(tmp_path / "dl"), str(tmp_path / "_tmp")
    site["server"].reset_counts()
    first = download_shard(shard, dest, tmp, RuleSet([]), opts, 100)
    assert first["success"] == 3 and sum(site["server"].counts.values()) == 3
    again = download_shard(shard, dest, tmp, RuleSet([]), opts, 100)  # complete: reused
    assert again["reused"] and sum(site["server"].counts.values()) == 3
    with open(tmp_path / "dl" / "m.tar", "ab") as f:  # a tar that is not the one its index describes
        f.write(b"\0" * 512)
    assert read_download(dest, shard) is None
    download_shard(shard, dest, tmp, RuleSet([]), opts, 100)
    assert sum(site["server"].counts.values()) == 6 and read_download(dest, shard) is not None
    members = tar_samples(str(tmp_path / "dl" / "m.tar"))
    assert sorted(image_ext(m) for m in members.values()) == ["jpg", "jpg", "png"]


def test_img2dataset_failed_rows_are_accounted_as_errors_after_the_samples():
    from shardsmith.pipelines.formats.img2dataset import failure_kind, merge_index_rows
    from shardsmith.pipelines.formats.scores import SCORES_SCHEMA

    scores = pa.Table.from_pylist([
        {"key": "000000001", "row": 0, "status": "kept", "aesthetic": 6.0, "original_width": 10, "original_height": 10},
        {"key": "000000003", "row": 1, "status": "dropped", "reason": "aesthetic>=5"},
    ], schema=SCORES_SCHEMA)
    index = pa.Table.from_pylist([
        {"key": "000000000", "status": "failed_to_download", "error_message": "HTTP Error 404: Not Found",
         "url": "http://x/0"},
        {"key": "000000001", "status": "success", "error_message": None, "url": "http://x/1"},
        {"key": "000000002", "status": "failed_to_download", "error_message": "<urlopen error timed out>",
         "url": "http://x/2"},
        {"key": "000000003", "status": "success", "error_message": None, "url": "http://x/3"},
        {"key": "000000004", "status": "failed_to_resize", "error_message": "cannot identify image file",
         "url": "http://x/4"},
    ])
    merged = merge_index_rows(scores, index).to_pylist()
    assert [(r["key"], r["row"], r["status"], r["reason"]) for r in merged] == [
        ("000000001", 0, "kept", None), ("000000003", 1, "dropped", "aesthetic>=5"),
        ("000000000", 2, "error", "http_404"), ("000000002", 3, "error", "timeout"),
        ("000000004", 4, "error", "not_an_image")]
    assert merged[2]["error"] == "HTTP Error 404: Not Found" and merged[2]["url"] == "http://x/0"
    assert failure_kind("failed_to_download", "503 Server Error: Service Unavailable") == "http_5xx"
    assert failure_kind("failed_to_download", "something odd") == "failed_to_download"
    only_success = index.filter(pa.array([s == "success" for s in index.column("status").to_pylist()]))
    assert merge_index_rows(scores, only_success).equals(scores)



def test_other_producers_failed_rows_are_merged_with_their_kind():
    """Only no-sample statuses are merged: shardsmith generate's `error` rows (a prompt that made no
    image) are input rows too; an unknown status is left alone."""
    from shardsmith.pipelines.formats.img2dataset import merge_index_rows
    from shardsmith.pipelines.formats.scores import SCORES_SCHEMA

    scores = pa.Table.from_pylist([{"key": "a", "row": 0, "status": "kept"}], schema=SCORES_SCHEMA)
    index = pa.Table.from_pylist([{"key": "a", "status": "success", "error_message": None},
                                  {"key": "b", "status": "error", "error_message": "cannot decode: no prompt"},
                                  {"key": "c", "status": "pending", "error_message": None}])
    merged = merge_index_rows(scores, index).to_pylist()
    assert [(r["key"], r["row"], r["status"], r["reason"]) for r in merged] == [
        ("a", 0, "kept", None), ("b", 1, "error", "generation_error")]
