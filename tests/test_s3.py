"""Curate reading from and writing to S3, against a real S3-compatible server (moto's standalone
server, started here), through s3fs exactly as on AWS or MinIO.

Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), the endpoint
from AWS_ENDPOINT_URL_S3; nothing is passed in code. The S3 runs are the plain CLI
(``python -m shardsmith.jobs.curate``) in a subprocess with that environment, as a user or a cluster node
would run it; the reference is the same run on local files. The results must be equal, a resumed
S3 run must finish what an interrupted one left, and the secret must appear in no output and no
log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_scores
from s3_server import MotoServer, assert_same_scores, model_flags, s3_scores, small_sample_reference

pytestmark = pytest.mark.timeout(900)  # two bounded CLI runs (300 s each at most) and a local one

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "shardsmith-s3-test"


def clean_env(**extra) -> dict:
    """This process's environment without AWS or Ray connection settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "FSSPEC_")) and k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def run_cli(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardsmith.jobs.curate", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(ray_local, tiny_models, tmp_path_factory):
    return small_sample_reference(tmp_path_factory, tiny_models)


@pytest.fixture(scope="module")
def s3(tmp_path_factory, reference):
    with MotoServer(str(tmp_path_factory.mktemp("moto") / "moto.log")) as server:
        server.upload_dir(reference["sample"]["images"], f"s3://{BUCKET}/in/images")
        yield server


@pytest.fixture(scope="module")
def s3_runs(s3, tiny_models):
    """A full run on S3, then a resumed run after losing one shard's commit, with their logs."""
    env = clean_env(**s3.env)
    args = [f"s3://{BUCKET}/in/images", f"s3://{BUCKET}/out", *model_flags(tiny_models)]
    first = run_cli(args, env)
    assert first.returncode == 0, first.stderr[-3000:]
    fs = s3.filesystem()
    first_scores = s3_scores(fs, f"{BUCKET}/out")
    # Lose shard 00001's commit and outputs, as a run killed before it committed would.
    for path in fs.glob(f"{BUCKET}/out/*/00001.*"):
        fs.rm(path)
    resumed = run_cli(args, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"first": first, "resumed": resumed, "first_scores": first_scores}


def test_curate_on_s3_equals_the_same_run_on_local_files(s3, s3_runs, reference):
    out, local_stats = Path(reference["output"]), reference["stats"]
    fs = s3.filesystem()
    assert_same_scores(s3_runs["first_scores"], read_scores(out))
    stats = json.loads(fs.cat_file(f"{BUCKET}/out/stats.json"))
    for key in ("rows_read", "kept", "dropped", "errors", "dropped_by_reason", "errors_by_kind"):
        assert stats[key] == local_stats[key], key
    assert stats["kept"] + stats["dropped"] + stats["errors"] == stats["rows_read"] == 40
    # kept samples are copied byte for byte, wherever the source tar lives
    for name in ("00000", "00001"):
        assert fs.cat_file(f"{BUCKET}/out/curated/{name}.tar") == (out / "curated" / f"{name}.tar").read_bytes()


def test_resumed_s3_run_redoes_only_the_lost_shard_and_ends_identical(s3, s3_runs):
    assert "1 already committed, 1 to do" in s3_runs["resumed"].stdout
    fs = s3.filesystem()
    assert sorted(os.path.basename(p) for p in fs.glob(f"{BUCKET}/out/_ledger/*.json")) == ["00000.json", "00001.json"]
    assert_same_scores(s3_scores(fs, f"{BUCKET}/out"), s3_runs["first_scores"])
    assert not fs.glob(f"{BUCKET}/out/_tmp/*")


def test_credentials_appear_in_no_output_and_no_log(s3, s3_runs):
    fs = s3.filesystem()
    files = fs.find(f"{BUCKET}/out")
    blobs = {f: fs.cat_file(f) for f in files}
    assert any(f.endswith("manifest.json") for f in blobs) and len(blobs) >= 10
    # the grep is live: it finds what the outputs do record (the input URLs)
    assert BUCKET.encode() in blobs[f"{BUCKET}/out/manifest.json"]
    for secret in (s3.secret_key, s3.access_key):
        leaked = [f for f, data in blobs.items() if secret.encode() in data]
        assert not leaked, f"credential written to {leaked}"
        for run in ("first", "resumed"):
            assert secret not in s3_runs[run].stdout + s3_runs[run].stderr


def test_missing_credentials_fail_fast_with_a_clear_message(s3, tiny_models, tmp_path):
    """No credentials anywhere: exit 2 before any Ray work, naming the URL and where keys come from."""
    env = clean_env(AWS_ENDPOINT_URL_S3=s3.endpoint, AWS_CONFIG_FILE=str(tmp_path / "none"),
                    AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    r = run_cli([f"s3://{BUCKET}/in/images", str(tmp_path / "out"), *model_flags(tiny_models)], env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert f"s3://{BUCKET}/in/images" in last and "credentials" in last.lower() and "AWS_ENDPOINT_URL_S3" in last
    assert "Traceback" not in r.stderr
