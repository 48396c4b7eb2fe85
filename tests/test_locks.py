"""One run per OUTPUT (pipelines/core/lock.py): the lease on a local filesystem and on S3 (the moto
server of tests/s3_server.py, with and without a proxy that strips conditional-write headers),
real processes racing for it, and two real ``shardsmith generate`` runs into one OUTPUT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from jobrun import assert_same_outputs, cli, committed, finish, snapshot, wait_for
from ray_nodes import LocalRayCluster, cluster_env, write_token
from s3_proxy import FaultProxy
from s3_server import MotoServer

from shardsmith.errors import RunError
from shardsmith.pipelines.core.lock import LEASE_FILE, Holder, Lease

pytestmark = pytest.mark.timeout(600)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "shardsmith-locks"
QUIET = dict(log=lambda *a: None)


def lease(out, ttl=30.0, **kw) -> Lease:
    return Lease(str(out), "shardsmith test", ttl=ttl, on_lost=lambda: None, **{**QUIET, **kw})


# ---------------------------------------------------------------------------------------------
# The lease's rules, on a local filesystem and on S3
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with MotoServer(str(tmp_path_factory.mktemp("moto-locks") / "moto.log")) as server:
        server.filesystem().mkdir(BUCKET)
        yield server


@pytest.fixture
def s3_env(moto, monkeypatch):
    import s3fs

    def use(endpoint: str):
        for k, v in {**moto.credentials, "AWS_ENDPOINT_URL_S3": endpoint}.items():
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep an older endpoint

    use(moto.endpoint)
    yield use
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """An OUTPUT URL on each kind of store."""
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_env")
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}-{time.monotonic_ns()}"


def test_a_second_run_is_refused_naming_the_holder(where):
    import socket

    a = lease(where)
    a.acquire()
    with pytest.raises(RunError) as e:
        lease(where).acquire()
    msg = str(e.value)
    assert where in msg and f"pid {os.getpid()}" in msg and f"host {socket.gethostname()}" in msg
    assert "started " in msg and "UTC" in msg and "--break-lock" in msg and "\n" not in msg
    a.release()
    b = lease(where)
    b.acquire()  # a released lease is free at once
    b.release()


def test_a_lease_not_renewed_is_taken_over_once_it_expires(where):
    logs: list[str] = []
    a = lease(where, ttl=1.0)
    a.acquire()  # never renewed: its run was killed
    with pytest.raises(RunError):
        lease(where, ttl=1.0).acquire()
    time.sleep(1.2)  # past the lease's expiry (what is waited for, not a bound on anything)
    b = lease(where, ttl=30.0, log=logs.append)
    b.acquire()
    assert len(logs) == 1 and "its lease expired" in logs[0] and f"pid {os.getpid()}" in logs[0]
    assert a.renew_once() is False and "lost its lease" in a.lost  # the old holder learns it lost
    assert b.renew_once() is True
    b.release()


def test_break_lock_takes_a_live_lease_at_once(where):
    logs: list[str] = []
    a = lease(where)
    a.acquire()
    b = lease(where, break_lock=True, log=logs.append)
    b.acquire()
    assert "--break-lock" in logs[0]
    assert not a.renew_once() and "now held by" in a.lost
    a.release()  # releasing a lost lease does not free the new holder's
    with pytest.raises(RunError):
        lease(where).acquire()
    b.release()


def test_the_renewal_thread_keeps_the_lease_and_stops_a_run_that_loses_it(where):
    lost = threading.Event()
    a = Lease(where, "shardsmith test", ttl=1.5, on_lost=lost.set, **QUIET)
    a.acquire()
    a.start()
    time.sleep(2.0)  # longer than the ttl: only the renewals keep it
    with pytest.raises(RunError):
        lease(where).acquire()
    b = lease(where, break_lock=True)
    b.acquire()
    assert lost.wait(timeout=30), "the holder never noticed it lost its lease"
    assert "now held by" in a.lost
    a.release()
    b.release()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # exited and reaped: no process has it (until the kernel reuses it)


def test_a_dead_process_on_this_host_loses_its_lease_at_once_one_elsewhere_does_not(tmp_path):
    import socket

    out = tmp_path / "out"
    a = lease(out, ttl=600.0)
    a.acquire()  # a lease for 10 minutes, then its process is "killed": the record names a dead pid
    record = json.loads((out / LEASE_FILE).read_text())
    (out / LEASE_FILE).write_text(json.dumps({**record, "pid": _dead_pid(), "host": "elsewhere"}))
    with pytest.raises(RunError, match="host elsewhere"):  # another host's pid means nothing here
        lease(out).acquire()
    (out / LEASE_FILE).write_text(json.dumps({**record, "pid": _dead_pid(), "host": socket.gethostname()}))
    logs: list[str] = []
    b = lease(out, log=logs.append)
    b.acquire()
    assert len(logs) == 1 and "its process is gone" in logs[0] and "no longer running on this host" in logs[0]
    b.release()


def test_a_half_written_lease_record_is_free(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_FILE).write_text('{"run_id": "abc", "tool": "shardsm')  # a writer killed mid-record
    assert Holder.parse((out / LEASE_FILE).read_bytes()) is None
    a = lease(out)
    a.acquire()
    assert Holder.parse((out / LEASE_FILE).read_bytes()).run_id == a.holder.run_id
    a.release()
    assert (out / LEASE_FILE).read_bytes() == b""  # released: an empty record, the file stays


RACER = """
import os, sys, time
from shardsmith.errors import RunError
from shardsmith.pipelines.core import lock
from shardsmith.pipelines.core.lock import Lease
out, gate, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
if len(sys.argv) > 4:  # widen the window between reading the record and writing it (local store)
    read = lock.LocalStore._read_fd
    def slow_read(fd):
        data = read(fd)
        time.sleep(float(sys.argv[4]))
        return data
    lock.LocalStore._read_fd = staticmethod(slow_read)
lease = Lease(out, "racer", ttl=60, log=lambda *a: None, on_lost=lambda: None)
open(f"{gate}.ready.{os.getpid()}", "w").close()
while not os.path.exists(gate):  # every racer waits here; the test opens the gate once all are
    pass
try:
    lease.acquire()
except RunError:
    print("REFUSED", flush=True)
    sys.exit(0)
print("WON", flush=True)
time.sleep(hold)
deadline = time.monotonic() + 120
while not os.path.exists(f"{gate}.release") and time.monotonic() < deadline:  # alive till the others decided
    time.sleep(0.05)
print("STILL" if lease.renew_once() else "LOST", flush=True)
"""


def race(where: str, n: int, env: dict, gate: str, *extra: str) -> list[list[str]]:
    """``n`` processes take OUTPUT's lease at the same moment: each one's outcome."""
    import glob

    procs = [subprocess.Popen([sys.executable, "-c", RACER, where, gate, "2", *extra], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    assert wait_for(lambda: len(glob.glob(f"{gate}.ready.*")) == n, 120), "the racers never got ready"
    open(gate, "w").close()
    # the winner holds the lease (its process alive) until every other racer has decided
    assert wait_for(lambda: sum(p.poll() is not None for p in procs) >= n - 1, 120), "the racers never decided"
    open(f"{gate}.release", "w").close()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outs.append(out.split())
    return outs


def test_processes_racing_for_a_local_output_exactly_one_wins(tmp_path):
    """Each racer sleeps 0.5 s between reading the lease record and writing its own, so that all of
    them would read it free at once were the read-decide-write not under the lock."""
    outs = race(str(tmp_path / "out"), 6, {**os.environ, "PYTHONPATH": ROOT}, str(tmp_path / "gate"), "0.5")
    assert sorted(o[0] for o in outs) == ["REFUSED"] * 5 + ["WON"]
    assert [o for o in outs if o[0] == "WON"] == [["WON", "STILL"]]


def test_processes_racing_for_an_s3_output_leave_one_holder(moto, s3_env, tmp_path):
    """S3's conditional create lets one writer win; moto checks conditions without a lock (real S3
    is atomic), so more than one racer can see its create accepted there -- the renewal, If-Match on
    the ETag, leaves exactly one holder either way."""
    env = {**os.environ, "PYTHONPATH": ROOT, **moto.env}
    outs = race(f"s3://{BUCKET}/race-{time.monotonic_ns()}", 6, env, str(tmp_path / "gate"))
    assert sum(o[0] == "WON" for o in outs) >= 1
    assert sum(o == ["WON", "STILL"] for o in outs) == 1, outs


def test_an_s3_endpoint_that_ignores_conditional_writes_is_detected(moto, s3_env):
    """Behind a proxy that strips If-None-Match/If-Match (as stores without conditional writes
    behave), the lease says it is best effort there, and a second run is still refused."""
    with FaultProxy(moto.port) as proxy:
        proxy.strip_conditions = True
        s3_env(proxy.endpoint)
        logs: list[str] = []
        where = f"s3://{BUCKET}/no-conditions-{time.monotonic_ns()}"
        a = lease(where, log=logs.append)
        a.acquire()
        assert a.store.atomic is False and any("best effort" in x for x in logs)
        with pytest.raises(RunError, match="being written by another run"):
            lease(where).acquire()
        assert a.renew_once()
        a.release()


# ---------------------------------------------------------------------------------------------
# End to end: real generate runs into one OUTPUT
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("lock-e2e")
    env = cluster_env(write_token(str(d / "token")), {"PYTHONPATH": ROOT})
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}", "seed": i}) + "\n" for i in range(16)))
    with LocalRayCluster(str(d), env) as c:
        c.start_head(num_cpus=2)

        def args(out, *extra):
            return ["shardsmith.jobs.generate", str(prompts), str(out), "--model", tiny_models["sd_model"],
                    "--address", c.gcs_address, "--steps", "2", "--width", "64", "--height", "64",
                    "--shard-size", "2", "--batch-size", "1", "--lock-ttl", "30", *extra]

        ref = d / "ref"
        code, _, err = finish(cli(args(ref, "--quiet"), env, d / "ref.log"))
        assert code == 0, err[-3000:]
        yield {"args": args, "env": env, "ref": ref, "dir": d}


@pytest.mark.faults
def test_two_runs_started_at_once_one_is_refused_the_other_completes(gen, tmp_path):
    out = tmp_path / "out"
    a = cli(gen["args"](out, "--quiet"), gen["env"], tmp_path / "a.log")
    b = cli(gen["args"](out, "--quiet"), gen["env"], tmp_path / "b.log")
    (ca, _, ea), (cb, _, eb) = finish(a), finish(b)
    assert sorted([ca, cb]) == [0, 2], (ea[-2000:], eb[-2000:])
    loser, winner = (a, b) if ca == 2 else (b, a)
    last = (ea if ca == 2 else eb).strip().splitlines()[-1]
    assert "being written by another run" in last and f"pid {winner.pid}" in last, last
    assert_same_outputs(gen["ref"], out)


@pytest.mark.faults
def test_a_killed_runs_lease_is_taken_over_by_its_rerun_on_the_same_host(gen, tmp_path):
    out = tmp_path / "out"
    a = cli(gen["args"](out), gen["env"], tmp_path / "a.log")
    assert wait_for(lambda: committed(out) >= 1, 300, a), "the run never committed a shard"
    os.killpg(a.pid, signal.SIGKILL)
    a.wait(timeout=30)
    done = committed(out)
    assert 0 < done < 8, done  # the kill interrupted the run
    holder = Holder.parse((out / LEASE_FILE).read_bytes())
    assert holder is not None and holder.pid == a.pid and holder.expires_at > time.time()  # still "held"
    code, stdout, err = finish(cli(gen["args"](out, "--quiet"), gen["env"], tmp_path / "b.log"))
    assert code == 0, err[-3000:]
    assert "taking over" in stdout and "its process is gone" in stdout and f"pid {a.pid}" in stdout
    assert f"{done} already committed" in stdout  # the killed run's commits were kept, not redone
    assert_same_outputs(gen["ref"], out)
