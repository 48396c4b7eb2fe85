"""A full disk (pipelines/core/fs.py): OUTPUT's filesystem fills in the middle of a curate run.
Nothing partial is committed, the run stops with one line naming the path (exit 2), and after
space is freed the rerun resumes and ends equal to a clean run.

The filesystem is a real, small tmpfs, mounted in a private mount namespace (``unshare``) so that
it is invisible to the rest of the machine and goes away with the scenario, even if it is killed.
The scenario itself is tests/full_disk_scenario.py (real CLI runs, each with its own local Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from jobrun import assert_same_outputs

pytestmark = [pytest.mark.faults, pytest.mark.long, pytest.mark.timeout(1200)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIO = os.path.join(ROOT, "tests", "full_disk_scenario.py")


def private_mount_namespace() -> list[str]:
    """The command prefix that runs a process in a mount namespace of its own where it may mount a
    tmpfs: as root ``unshare --mount``, otherwise a user namespace (``unshare -r``)."""
    probe = "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"
    tried = []
    for prefix in (["unshare", "--mount", "--propagation", "private"],
                   ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]):
        r = subprocess.run([*prefix, "sh", "-c", probe], capture_output=True, text=True)
        if r.returncode == 0:
            return prefix
        tried.append(f"{' '.join(prefix)}: {r.stderr.strip()[:200]}")
    pytest.fail("cannot mount a small tmpfs in a private mount namespace here (" + "; ".join(tried) + ")")


def test_a_full_output_disk_commits_nothing_partial_and_the_rerun_equals_a_clean_run(tiny_models, tmp_path):
    from s3_server import model_flags

    from shardsmith.jobs.sample_data import make_sample_data

    data = make_sample_data(str(tmp_path / "data"), shards=6, per_shard=10, metadata_files=1, metadata_rows=10,
                            max_size=200, seed=13)
    work = tmp_path / "work"
    work.mkdir()
    # every row kept (no rules): the curated tars hold the images, so each shard takes many pages
    job = ["shardsmith.jobs.curate", data["images"], "--quiet", "--no-report", "--preset", "none",
           *model_flags(tiny_models)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([*private_mount_namespace(), sys.executable, SCENARIO, str(work), str(work / "result.json"),
                        "--", *job], env=env, capture_output=True, text=True, timeout=1100)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((work / "result.json").read_text())
    mnt_out = str(work / "mnt" / "out")

    # the full disk: exit 2, one line naming the path, no traceback
    assert res["full_code"] == 2, res["full_err"]
    last = res["full_err"].strip().splitlines()[-1]
    assert "no space left on device writing" in last and mnt_out in last and "MB free" in last, last
    assert "rerun the same command" in last and "Traceback" not in res["full_err"]

    # nothing partial committed: every committed shard's files, as they were when the disk was full,
    # equal the clean run's; no temporary file where outputs are read
    committed = [n.removesuffix(".json") for n in res["committed_when_full"]]
    assert 0 < len(committed) < 6, (committed, res["shard_bytes"], res["budget"])
    when_full, ref = work / "out-when-full", work / "ref"
    for shard in committed:
        entry = json.loads((when_full / "_ledger" / f"{shard}.json").read_text())
        assert entry["outputs"], entry
        for rel in entry["outputs"]:
            if rel.endswith(".parquet"):
                assert pq.read_table(when_full / rel).equals(pq.read_table(ref / rel)), rel
            else:
                assert (when_full / rel).read_bytes() == (ref / rel).read_bytes(), rel
    assert not [f for f in res["files_when_full"] if ".tmp-" in f and not f.startswith("_tmp")]

    # space freed: the rerun resumes (the committed shards are not redone) and equals a clean run
    assert res["rerun_code"] == 0, res["rerun_err"]
    assert f"{len(committed)} already committed, {6 - len(committed)} to do" in res["rerun_out"]
    assert assert_same_outputs(ref, work / "out") >= 60
