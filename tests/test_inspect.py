"""``shardsmith inspect``: a shard's rows as a terminal table, one sample in full, its image bytes
written out exactly as they are in the tar; clear one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
from conftest import curate_config

from shardsmith.jobs.inspect import clean
from shardsmith.jobs.inspect import main as inspect_main
from shardsmith.pipelines.flows.curate import run_curate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_out(ray_local, tiny_models, sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "out"
    run_curate(curate_config(sample["shards"][0], out, tiny_models), log=lambda *a: None)
    return out


def tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def image_member(members: dict[str, bytes], key: str) -> bytes:
    return next(v for n, v in members.items() if n.split(".")[0] == key and not n.endswith((".txt", ".json")))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "shardsmith.jobs.cli", "inspect", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_output_folder_lists_its_shards(run_out, capsys):
    assert inspect_main([str(run_out)]) == 0
    out = capsys.readouterr().out
    stats = json.load(open(run_out / "stats.json"))
    line = next(ln for ln in out.splitlines() if ln.startswith("00000"))
    assert line.split() == ["00000", *(str(stats[k]) for k in ("rows_read", "kept", "dropped", "errors"))]
    assert "--shard NAME" in out


def test_shard_table_has_every_row_with_status_and_scores(run_out, capsys):
    assert inspect_main([str(run_out), "--shard", "00000", "--limit", "0"]) == 0
    out = capsys.readouterr().out
    rows = pq.read_table(run_out / "scores" / "00000.parquet").to_pylist()
    for r in rows:
        line = next(ln for ln in out.splitlines() if f" {r['key']} " in ln)
        assert r["status"] in line.split()
        if r["aesthetic"] is not None:
            assert f"{r['aesthetic']:.3f}" in line
    assert "key" in out.splitlines()[1] and "status" in out.splitlines()[1]


def test_status_filter_and_sort(run_out, capsys):
    assert inspect_main([str(run_out / "scores" / "00000.parquet"), "--status", "dropped", "--sort", "aesthetic"]) == 0
    lines = capsys.readouterr().out.splitlines()
    body = lines[3:lines.index("")]  # title, header, ---, rows, blank line
    rows = pq.read_table(run_out / "scores" / "00000.parquet").to_pylist()
    dropped = sorted((r for r in rows if r["status"] == "dropped"), key=lambda r: -r["aesthetic"])
    assert [ln.split()[1] for ln in body] == [r["key"] for r in dropped]


@pytest.mark.parametrize("status", ["kept", "dropped"])
def test_write_image_from_scores_parquet_is_the_original_bytes(run_out, sample, tmp_path, capsys, status):
    """Kept images come from curated/, dropped ones from the input tar named in manifest.json."""
    rows = pq.read_table(run_out / "scores" / "00000.parquet").to_pylist()
    key = next(r["key"] for r in rows if r["status"] == status)
    target = tmp_path / "img.jpg"
    assert inspect_main([str(run_out / "scores" / "00000.parquet"), "--key", key, "--write-image", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"key: {key}" in out and "status: " + status in out
    assert target.read_bytes() == image_member(tar_members(sample["shards"][0]), key)
    source = "curated/00000.tar" if status == "kept" else sample["shards"][0]
    assert source in out


def test_tar_key_and_write_image(run_out, sample, tmp_path, capsys):
    members = tar_members(sample["shards"][0])
    key = sorted({n.split(".")[0] for n in members})[1]
    target = tmp_path / "x.png"
    assert inspect_main([sample["shards"][0], "--key", key, "--write-image", str(target)]) == 0
    out = capsys.readouterr().out
    assert target.read_bytes() == image_member(members, key)
    assert "caption: " + members[f"{key}.txt"].decode() in out
    # a curated tar is joined with its scores
    kept = pq.read_table(run_out / "curated" / "00000.parquet").column("key").to_pylist()
    assert inspect_main([str(run_out / "curated" / "00000.tar"), "--limit", "0"]) == 0
    out = capsys.readouterr().out
    assert all(f" {k} " in out for k in kept) and out.count(" kept ") == len(kept)


def test_errors_are_one_line_with_exit_code_2(run_out, tmp_path, capsys):
    cases = [
        ((run_out, "--shard", "00000", "--key", "nope"), "key 'nope' is not in"),
        ((run_out, "--shard", "99999"), "has no shard '99999'"),
        ((tmp_path / "missing.parquet",), "no such file or folder"),
        ((run_out / "scores" / "00000.parquet", "--write-image", tmp_path / "a.jpg"), "--write-image needs --key"),
        ((run_out / "stats.json",), "expected a .parquet or .tar file"),
    ]
    for args, message in cases:
        assert inspect_main([str(a) for a in args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("shardsmith inspect: error: ") and message in err and err.count("\n") == 1, err
    r = run_cli(*cases[0][0])  # the real command: no traceback either
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and cases[0][1] in r.stderr and "Traceback" not in r.stderr


def test_metadata_rows_have_no_image(ray_local, sample, tmp_path, capsys):
    from shardsmith.pipelines.config import CurateConfig

    out = tmp_path / "meta"
    run_curate(CurateConfig(input=sample["metadata_files"][0], output=str(out), progress=False, report=False),
               log=lambda *a: None)
    key = pq.read_table(out / "scores" / "part-00000.parquet").column("key")[0].as_py()
    code = inspect_main([str(out / "scores" / "part-00000.parquet"), "--key", key, "--write-image", str(tmp_path / "i")])
    assert code == 2 and "metadata-only run: it has no images" in capsys.readouterr().err


def test_untrusted_text_cannot_drive_the_terminal():
    assert clean("red\x1b[2J\x1b]0;title\x07 cat\nline", 40) == "red?[2J?]0;title? cat?line"
    assert clean("x" * 50, 10) == "x" * 9 + "…"
