"""No silent hang (pipelines/core/dispatch.py): a stage that stops delivering rows -- a scoring actor
whose forward never returns, a read stuck on its input, a diffusion actor that dies on every
attempt (Ray restarts it and retries, forever) -- stops the run within ``--stall-timeout`` with
one line naming the stage and the shard; a rerun resumes and ends equal to a clean run.

The mechanism is tested as a function first (a feed that blocks, no Ray); then as real CLI runs on
a Ray cluster started here: an input shard that is a named pipe going silent half-way, and
diffusion actors killed as soon as they appear."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pyarrow as pa
import pytest
from jobrun import assert_same_outputs, cli, committed, finish, wait_for
from ray_nodes import LocalRayCluster, cluster_env, cmdline, descendants, write_token

from shardsmith.pipelines.core.dispatch import Dispatcher, ShardCollector, StallError, Watchdog, stream_to_writers

pytestmark = pytest.mark.timeout(900)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_watchdog_counts_from_the_last_progress():
    clock = Clock()
    w = Watchdog(10, clock)
    clock.t = 9.9
    assert not w.stalled()
    w.progress()
    clock.t = 19.8
    assert not w.stalled() and w.left() == pytest.approx(0.1)
    clock.t = 19.95
    assert w.stalled()
    with pytest.raises(Exception, match="must be > 0"):
        Watchdog(0)


def rows(shard: str, start: int, n: int, total: int | None = None) -> pa.Table:
    r = list(range(start, start + n)) + ([-1] if total is not None else [])
    return pa.table({"shard": [shard] * len(r), "row": r, "shard_rows": [total or 0] * len(r)})


def test_a_feed_that_stops_delivering_is_a_one_line_stall_naming_stage_and_shard():
    """The dataset delivers part of shard 00001, then blocks forever (as an iterator over a hung
    actor's output does). The driver stops after the limit instead of waiting. The watchdog's clock
    starts when the feed blocks, so a slow machine cannot fire it earlier."""
    forever, blocked = threading.Event(), threading.Event()
    since: list[float] = []

    def clock() -> float:
        return time.monotonic() - since[0] if blocked.is_set() else 0.0

    def batches():
        yield rows("00000", 0, 4, total=4)
        yield rows("00001", 0, 3)
        since.append(time.monotonic())
        blocked.set()
        forever.wait()  # never set: a forward that never returns
        yield rows("00001", 3, 1, total=4)

    submitted = []
    dispatcher = _NoRayDispatcher(stall_timeout=1.0)
    dispatcher.watchdog = Watchdog(1.0, clock)
    with pytest.raises(StallError) as e:
        stream_to_writers(batches(), ShardCollector(), lambda name, table: submitted.append(name), dispatcher,
                          stage="score", names=["00000", "00001", "00002"])
    msg = str(e.value)
    assert "\n" not in msg and "no progress for 1 s" in msg and "score stage" in msg
    assert "shard 00001 (3 of ? rows received), shard 00002 (no row received yet)" in msg and "rerun" in msg
    assert submitted == ["00000"]  # the complete shard was handed on before the stall


class _NoRayDispatcher(Dispatcher):
    """The real Dispatcher, whose submitted 'tasks' are finished at once (no Ray needed)."""

    def __init__(self, stall_timeout: float):
        super().__init__(4, None, stall_timeout)

    def submit(self, ref, tag=None, name=None) -> None:
        self.watchdog.progress()


def test_the_dataset_error_reaches_the_driver_as_it_was_raised():
    def batches():
        yield rows("00000", 0, 2)
        raise ValueError("the stage failed")

    with pytest.raises(ValueError, match="the stage failed"):
        stream_to_writers(batches(), ShardCollector(), lambda n, t: None, _NoRayDispatcher(30.0))


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

def actors(node_pid: int, cls: str) -> list[int]:
    return [p for p in descendants(node_pid) if cls in cmdline(p)]


@pytest.fixture(scope="module")
def cluster(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("watchdog")
    env = cluster_env(write_token(str(d / "token")), {"PYTHONPATH": ROOT})
    with LocalRayCluster(str(d), env) as c:
        c.start_head(num_cpus=2)
        yield c, env, d


def clean_run(proc) -> int:
    """Wait for a clean reference run; returns the stall limit for the faulty one: 1.5 x the whole
    clean run (at least 30 s), so that no gap of a healthy run -- actor start and model load
    included -- comes near it, on an idle machine or a loaded one."""
    t0 = time.monotonic()
    code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    return max(30, int(1.5 * (time.monotonic() - t0)))


def curate_args(src, out, models, address, *extra):
    return ["shardsmith.jobs.curate", str(src), str(out), "--address", address, "--quiet", "--no-report",
            "--batch-size", "4", "--clip-model", models["clip_model"], "--clip-pretrained", models["clip_pretrained"],
            "--aesthetic-head", models["aesthetic_head"], "--watermark-head", models["watermark_head"],
            "--nsfw-head", models["nsfw_head"], *extra]


@pytest.mark.faults
@pytest.mark.long
def test_a_stage_stuck_on_its_input_stops_the_run_naming_stage_and_shard(cluster, tiny_models, tmp_path):
    """Shard 00009 is a named pipe that delivers half of its tar and then nothing, the writer
    keeping it open (a stalled network filesystem): the read task blocks in read() with its process
    alive and answering Ray, so Ray sees nothing wrong. Only the watchdog stops the run.

    (A scoring actor frozen with SIGSTOP was, in our runs, detected and replaced by Ray itself,
    which retried its work: that case needs no watchdog.)"""
    import shutil

    from shardsmith.jobs.sample_data import make_sample_data

    c, env, d = cluster
    data = make_sample_data(str(tmp_path / "data"), shards=10, per_shard=24, metadata_files=1, metadata_rows=10,
                            max_size=120, seed=9)
    clean = tmp_path / "clean-input"
    shutil.copytree(data["images"], clean)
    tar = os.path.join(data["images"], "00009.tar")
    content = open(tar, "rb").read()
    os.remove(tar)
    os.mkfifo(tar)

    def serve(upto: int, hold: threading.Event) -> threading.Thread:
        def run():
            try:
                with open(tar, "wb") as f:  # blocks until the read task opens the pipe
                    f.write(content[:upto])
                    f.flush()
                    hold.wait()  # then nothing more, the pipe still open
            except OSError:  # the reader went away
                pass
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    ref = tmp_path / "ref"
    limit = clean_run(cli(curate_args(clean, ref, tiny_models, c.gcs_address), env, tmp_path / "ref"))
    out = tmp_path / "out"
    release = threading.Event()
    writer = serve(len(content) // 2, release)
    code, _, err = finish(cli(curate_args(data["images"], out, tiny_models, c.gcs_address, "--stall-timeout",
                                          str(limit)), env, tmp_path / "stuck"))
    release.set()
    writer.join(timeout=30)
    done = committed(out)
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    # where it waits depends on where the pipe blocks first: the reading (no rows out of the score
    # stage) or the writer's copy of the kept samples from the same input (the write of 00009)
    assert f"no progress for {limit} s" in last and "shard 00009" in last, last
    assert "score stage" in last or "the write of shard 00009" in last, last
    assert "Traceback" not in err and 0 < done < 10, done
    # the filesystem is back: the shard is a plain file again (a pipe can be read once, and the
    # writer reads its kept samples from the input a second time)
    os.remove(tar)
    with open(tar, "wb") as f:
        f.write(content)
    code, stdout, err = finish(cli(curate_args(data["images"], out, tiny_models, c.gcs_address), env,
                                   tmp_path / "rerun"))
    assert code == 0, err[-3000:]
    assert f"{done} already committed" in stdout
    assert assert_same_outputs(ref, out) >= 240


@pytest.mark.faults
@pytest.mark.long
def test_a_diffusion_actor_dying_on_every_attempt_stops_the_run(cluster, tiny_models, tmp_path):
    c, env, d = cluster
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}", "seed": i}) + "\n" for i in range(8)))

    def args(out, *extra):
        return ["shardsmith.jobs.generate", str(prompts), str(out), "--model", tiny_models["sd_model"], "--address",
                c.gcs_address, "--quiet", "--steps", "2", "--width", "64", "--height", "64", "--shard-size", "2",
                "--batch-size", "1", *extra]

    ref = tmp_path / "ref"
    limit = clean_run(cli(args(ref), env, tmp_path / "ref"))
    out = tmp_path / "out"
    proc = cli(args(out, "--stall-timeout", str(limit)), env, tmp_path / "dying")
    head = c.nodes[0][0].pid
    assert wait_for(lambda: committed(out) >= 1, 400, proc), "no commit seen"
    kills = 0
    while proc.poll() is None:  # every diffusion actor is killed as soon as it shows up, until the run gives up
        for pid in actors(head, "GenerateStage"):
            try:
                os.kill(pid, signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    done = committed(out)
    code, _, err = finish(proc)
    assert code == 2 and kills >= 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert f"no progress for {limit} s" in last and "generate (diffusion actors) stage" in last and "shard 0000" in last, last
    assert 0 < done < 4, done
    code, stdout, err = finish(cli(args(out), env, tmp_path / "rerun"))
    assert code == 0, err[-3000:]
    assert f"{done} already committed" in stdout
    assert_same_outputs(ref, out)
