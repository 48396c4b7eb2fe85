"""Helpers for the tests that run jobs as real CLI processes and interrupt them: start a job with
its output in files (a pipe nobody reads would block it), wait on observed progress (ledger
entries), compare every output file with a clean run's."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(args: list[str], env: dict, log_base, **kw) -> subprocess.Popen:
    """``python -m ARGS`` in its own process group; stdout/stderr go to LOG_BASE.out/.err."""
    out, err = open(f"{log_base}.out", "w"), open(f"{log_base}.err", "w")
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True, **kw)
    proc.logs = (out.name, err.name)
    out.close()
    err.close()
    return proc


def logs(proc) -> tuple[str, str]:
    with open(proc.logs[0]) as o, open(proc.logs[1]) as e:
        return o.read(), e.read()


def finish(proc, timeout: float = 420) -> tuple[int, str, str]:
    proc.wait(timeout=timeout)
    return (proc.returncode, *logs(proc))


def committed(out) -> int:
    """Shards committed in OUTPUT: its ledger entries."""
    return len(glob.glob(os.path.join(str(out), "_ledger", "*.json")))


def wait_for(pred, timeout: float, proc=None, poll: float = 0.1) -> bool:
    """Wait until ``pred()``; False at the timeout, or when ``proc`` ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return pred()
        time.sleep(poll)
    return pred()


def snapshot(out) -> dict[str, tuple[int, int]]:
    """Every file under OUTPUT: (size, mtime in ns)."""
    got = {}
    for root, _, names in os.walk(out):
        for n in names:
            p = os.path.join(root, n)
            st = os.stat(p)
            got[os.path.relpath(p, out)] = (st.st_size, st.st_mtime_ns)
    return got


def output_files(out) -> dict[str, str]:
    """Every file a reader of OUTPUT sees, except the ledger's timestamps, the run's timings and the
    lease record."""
    files = {}
    for root, _, names in os.walk(out):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), out)
            assert ".tmp-" not in rel or rel.startswith("_tmp"), f"temporary file where outputs are read: {rel}"
            if rel.startswith(("_ledger", "_tmp")) or rel in ("manifest.json", "stats.json", "_lease.json"):
                continue
            files[rel] = os.path.join(root, n)
    assert not os.path.exists(os.path.join(str(out), "_tmp")), "_tmp left after a finished run"
    return files


def assert_same_outputs(ref, got) -> int:
    """Every output file equal (parquet tables equal, other files byte for byte), no key twice in a
    scores file, the stats' accounting equal; returns the rows compared."""
    a, b = output_files(ref), output_files(got)
    assert sorted(a) == sorted(b)
    rows = 0
    for rel in a:
        if rel.endswith(".parquet"):
            ta, tb = pq.read_table(a[rel]), pq.read_table(b[rel])
            assert ta.equals(tb), rel
            if "key" in ta.column_names:
                reasons = ta.column("reason").to_pylist() if "reason" in ta.column_names else [None] * ta.num_rows
                keys = [k for k, r in zip(ta.column("key").to_pylist(), reasons) if r != "duplicate_key"]
                assert len(keys) == len(set(keys)), f"a row twice in {rel}"
            rows += ta.num_rows
        else:
            with open(a[rel], "rb") as fa, open(b[rel], "rb") as fb:
                assert fa.read() == fb.read(), rel
    sa = json.load(open(os.path.join(str(ref), "stats.json")))
    sb = json.load(open(os.path.join(str(got), "stats.json")))
    for k in ("rows_read", "kept", "dropped", "errors", "dropped_by_reason", "errors_by_kind", "shards_committed"):
        assert sa[k] == sb[k], k
    assert sb["kept"] + sb["dropped"] + sb["errors"] == sb["rows_read"]
    return rows
