"""Fault injection: kill the driver once the ledger shows some shards committed and others not,
kill a scoring actor, press Ctrl-C — then rerun the same command and compare with an
uninterrupted run, file by file.

Every interruption is triggered on observed progress (the ledger's entries, polled), and checked to
have interrupted something: ``0 < committed < total`` after the driver is dead. The rerun must redo
only what was not committed: the committed shards' ledger entries (their ``committed_at``) and
output files (their mtimes) are untouched, every other shard is committed after the kill.

The jobs run as real CLI processes (`python -m shardsmith.jobs.curate ...`) against a real Ray cluster
started here (a `ray start --head` node on loopback, token auth on), so that killing the driver
kills only the driver, as on a cluster. Marker: `faults` (part of `make test`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow.parquet as pq
import pytest
from ray_nodes import LocalRayCluster, cluster_env, cmdline, descendants, write_token

pytestmark = pytest.mark.faults
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = {"driver_kills_survived": 0, "kill_points": [], "actor_kills_survived": 0, "ctrl_c_survived": 0,
           "rows_checked": 0, "files_compared": 0}
CURATE_SHARDS = 6  # enough shards that a kill can land with some committed and some not


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults-cluster")
    env = cluster_env(write_token(str(d / "token")))
    with LocalRayCluster(str(d), env) as c:
        c.start_head(num_cpus=2)
        yield c, env
    out = os.environ.get("SHARDSMITH_FAULT_FIGURES")
    if out:
        with open(out, "w") as f:
            json.dump(FIGURES, f, indent=1)


def cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def curate_args(src, out, models, address):
    return ["shardsmith.jobs.curate", str(src), str(out), "--address", address, "--quiet", "--no-report", "--batch-size", "8",
            "--clip-model", models["clip_model"], "--clip-pretrained", models["clip_pretrained"],
            "--aesthetic-head", models["aesthetic_head"], "--watermark-head", models["watermark_head"],
            "--nsfw-head", models["nsfw_head"]]


def output_files(out):
    """Every file a reader of OUTPUT sees, except the ledger's timestamps and the run's timings."""
    files = {}
    for root, _, names in os.walk(out):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), out)
            assert ".tmp-" not in rel or rel.startswith("_tmp"), f"temporary file where outputs are read: {rel}"
            if rel.startswith(("_ledger", "_tmp")) or rel in ("manifest.json", "stats.json"):
                continue
            files[rel] = os.path.join(root, n)
    assert not os.path.exists(os.path.join(out, "_tmp")), "_tmp left after a finished run"
    return files


def assert_same_outputs(ref, got):
    a, b = output_files(ref), output_files(got)
    assert sorted(a) == sorted(b)
    for rel in a:
        if rel.endswith(".parquet"):
            ta, tb = pq.read_table(a[rel]), pq.read_table(b[rel])
            assert ta.equals(tb), rel
            if "key" in ta.column_names and rel.startswith("scores"):
                keys = [k for k, r in zip(ta.column("key").to_pylist(), ta.column("reason").to_pylist())
                        if r != "duplicate_key"]
                assert len(keys) == len(set(keys)), f"duplicate rows in {rel}"
                FIGURES["rows_checked"] += ta.num_rows
        else:
            with open(a[rel], "rb") as fa, open(b[rel], "rb") as fb:
                assert fa.read() == fb.read(), rel
        FIGURES["files_compared"] += 1
    sa = json.load(open(os.path.join(ref, "stats.json")))
    sb = json.load(open(os.path.join(got, "stats.json")))
    for k in ("rows_read", "kept", "dropped", "errors", "dropped_by_reason", "errors_by_kind"):
        assert sa[k] == sb[k], k
    assert sb["kept"] + sb["dropped"] + sb["errors"] == sb["rows_read"]


def ledger(out) -> dict[str, float]:
    """shard -> committed_at, as the ledger says now (entries are written atomically)."""
    d = os.path.join(out, "_ledger")
    entries = {}
    for n in os.listdir(d) if os.path.isdir(d) else []:
        if n.endswith(".json"):
            e = json.load(open(os.path.join(d, n)))
            entries[e["shard"]] = e["committed_at"]
    return entries


def shard_files(out, shards) -> dict[str, int]:
    """mtime_ns of every output file of these shards (named NNNNN.* or *_NNNNN.*)."""
    out_files = {}
    for root, _, names in os.walk(out):
        for n in names:
            stem = n.split(".")[0].rsplit("_", 1)[-1]
            if stem in shards and not root.startswith(os.path.join(str(out), "_tmp")):
                path = os.path.join(root, n)
                out_files[os.path.relpath(path, out)] = os.stat(path).st_mtime_ns
    return out_files


def interrupt_after_commits(args, env, out, k, total, sig=signal.SIGKILL, timeout=240, tries=3):
    """Start the job, wait until the ledger holds ``k`` of ``total`` shards, then send ``sig`` to its
    process group. Returns (exit code, stderr, the ledger after it ended, when the signal was sent).

    Shards that finish in one batch commit within milliseconds of each other, so a signal sent at
    ``k`` can land after the last commit: then the scenario did not happen (nothing was
    interrupted), and it is run again on a fresh output, up to ``tries`` times."""
    for attempt in range(tries):
        code, err, entries, sent_at = _interrupt_once(args, env, out, k, total, sig, timeout)
        if len(entries) < total or attempt == tries - 1:
            break
        shutil.rmtree(out)
    assert 0 < len(entries) < total, f"the interruption interrupted nothing: {len(entries)} of {total} committed"
    return code, err, entries, sent_at


def _interrupt_once(args, env, out, k, total, sig, timeout):
    proc = cli(args, env)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and len(ledger(out)) < k:
        time.sleep(0.02)
    if proc.poll() is not None:
        _, err = proc.communicate()
        pytest.fail(f"the run ended (exit {proc.returncode}) before {k} of {total} shards were committed: {err[-2000:]}")
    assert len(ledger(out)) >= k, f"fewer than {k} shards committed after {timeout} s"
    sent_at = time.time()
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)  # Ctrl-C reaches the driver
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, ledger(out), sent_at


def rerun_redoes_only_the_rest(args, env, out, before, sent_at, total):
    """Rerun; the committed shards are skipped (their ledger entries and files untouched), the
    others are committed by the rerun."""
    files_before = shard_files(out, set(before))
    code, out_text, err = finish(cli(args, env))
    assert code == 0, err[-3000:]
    assert f"{len(before)} already committed, {total - len(before)} to do" in out_text
    after = ledger(out)
    assert len(after) == total
    assert {n: after[n] for n in before} == before, "a committed shard was redone"
    assert all(after[n] > sent_at for n in after if n not in before), "a shard was not redone by the rerun"
    assert shard_files(out, set(before)) == files_before, "a committed shard's files were rewritten"
    FIGURES["kill_points"].append(f"{len(before)}/{total}")


@pytest.fixture(scope="module")
def fault_sample(tmp_path_factory):
    from shardsmith.jobs.sample_data import make_sample_data

    return make_sample_data(str(tmp_path_factory.mktemp("fault-sample")), shards=CURATE_SHARDS, per_shard=10,
                            metadata_files=1, metadata_rows=10, max_size=200, seed=5)


@pytest.fixture(scope="module")
def reference(cluster, tiny_models, fault_sample, tmp_path_factory):
    c, env = cluster
    out = tmp_path_factory.mktemp("faults-ref") / "out"
    code, _, err = finish(cli(curate_args(fault_sample["images"], out, tiny_models, c.gcs_address), env))
    assert code == 0, err[-3000:]
    assert len(ledger(out)) == CURATE_SHARDS
    return out


# k: shards committed when the driver is killed. 1 and 4 (of 6) bound the middle, which
# `make test-long` runs too (30 s each on 2 cores).
@pytest.mark.parametrize("k", [1, pytest.param(2, marks=pytest.mark.long), 4])
def test_driver_killed_with_shards_committed_and_not_then_resumed(cluster, tiny_models, fault_sample, reference,
                                                                  tmp_path, k):
    c, env = cluster
    out = tmp_path / "out"
    args = curate_args(fault_sample["images"], out, tiny_models, c.gcs_address)
    _, _, before, sent_at = interrupt_after_commits(args, env, out, k, CURATE_SHARDS)
    rerun_redoes_only_the_rest(args, env, out, before, sent_at, CURATE_SHARDS)
    assert_same_outputs(reference, out)
    FIGURES["driver_kills_survived"] += 1


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(cluster, tiny_models, fault_sample, reference, tmp_path):
    c, env = cluster
    out = tmp_path / "out"
    args = curate_args(fault_sample["images"], out, tiny_models, c.gcs_address)
    code, err, before, sent_at = interrupt_after_commits(args, env, out, 1, CURATE_SHARDS, sig=signal.SIGINT)
    assert code == 130, err[-2000:]
    assert "Traceback" not in err
    names = ", ".join(sorted(before))
    assert f"shardsmith curate: interrupted. {len(before)} shard(s) are committed in {out} ({names}). " \
           "Rerun the same command to resume" in err, err[-2000:]
    rerun_redoes_only_the_rest(args, env, out, before, sent_at, CURATE_SHARDS)
    assert_same_outputs(reference, out)
    FIGURES["ctrl_c_survived"] += 1


def test_killed_scoring_actor_is_retried_and_visible_in_stats(cluster, tiny_models, tmp_path):
    """Kill the scoring actor once the driver has received some scored rows but less than half."""
    import re
    import threading

    from shardsmith.jobs.sample_data import make_sample_data

    c, env = cluster
    data = make_sample_data(str(tmp_path / "data"), shards=8, per_shard=50, metadata_files=1, metadata_rows=10,
                            max_size=400, seed=3)
    out = tmp_path / "out"
    args = [a for a in curate_args(data["images"], out, tiny_models, c.gcs_address) if a != "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", *args, "--batch-size", "2"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    head_pid = c.nodes[0][0].pid
    killed, deadline = False, time.monotonic() + 240
    while not killed and time.monotonic() < deadline and proc.poll() is None:
        done = [int(m.group(1)) for m in (re.search(r"\[curate\] (\d+)/\d+ rows", ln) for ln in list(lines)) if m]
        if done and 0 < done[-1] < 200:
            victim = next((p for p in descendants(head_pid) if "ScoreStage" in cmdline(p)), None)
            if victim:
                os.kill(victim, signal.SIGKILL)
                killed = True
        time.sleep(0.1)
    assert killed, "the run never showed partial progress with a live scoring actor:\n" + "".join(lines)[-2000:]
    code = proc.wait(timeout=300)
    reader.join(timeout=10)
    assert code == 0, "".join(lines)[-3000:]
    stats = json.load(open(out / "stats.json"))
    assert stats["kept"] + stats["dropped"] + stats["errors"] == stats["rows_read"] == 400
    assert len(os.listdir(out / "_ledger")) == 8
    assert stats["scoring_actor_instances"] >= 2, stats["scoring_actor_instances"]  # the restart shows
    FIGURES["actor_kills_survived"] += 1
    FIGURES["rows_checked"] += stats["rows_read"]


def generate_args(prompts, out, models, address):
    return ["shardsmith.jobs.generate", str(prompts), str(out), "--model", models["sd_model"], "--address", address, "--quiet",
            # (128 px, 4 steps: a shard takes long enough that a kill after k commits lands before the next)
            "--steps", "4", "--width", "128", "--height", "128", "--shard-size", "3", "--batch-size", "2"]


GEN_SHARDS = 4  # 12 prompts, 3 per shard


@pytest.fixture(scope="module")
def gen_reference(cluster, tiny_models, tmp_path_factory):
    c, env = cluster
    d = tmp_path_factory.mktemp("gen-faults")
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}", "seed": i}) + "\n" for i in range(12)))
    code, _, err = finish(cli(generate_args(prompts, d / "ref", tiny_models, c.gcs_address), env))
    assert code == 0, err[-3000:]
    assert len(ledger(d / "ref")) == GEN_SHARDS
    return prompts, d / "ref"


@pytest.mark.parametrize("k", [1, pytest.param(2, marks=pytest.mark.long)])  # 2: in `make test-long`
def test_generate_killed_then_resumed_gives_the_same_images(cluster, tiny_models, gen_reference, tmp_path, k):
    c, env = cluster
    prompts, ref = gen_reference
    out = tmp_path / "out"
    args = generate_args(prompts, out, tiny_models, c.gcs_address)
    _, _, before, sent_at = interrupt_after_commits(args, env, out, k, GEN_SHARDS)
    rerun_redoes_only_the_rest(args, env, out, before, sent_at, GEN_SHARDS)
    assert_same_outputs(ref, out)
    with tarfile.open(out / "00000.tar") as t:
        assert len(t.getnames()) == 9
    FIGURES["driver_kills_survived"] += 1
