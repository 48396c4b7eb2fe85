"""Worker node loss on a 2-node loopback Ray cluster (tests/ray_nodes.py): in the middle of a curate
run and of a generate run, the worker node's ``ray start``, raylet, workers and agents are all
SIGKILLed at once (a preempted spot machine), while it runs a model actor and after some shards
are committed. The job completes on the head, or stops with a one-line message; either way the
final outputs (after a rerun where one was needed) equal a clean run's, every row exactly once.

The outcome of each kill (completed, or stopped and resumed) is recorded in
``SHARDSMITH_FAULT_FIGURES`` when that variable names a file (docs/reliability.md has the figures).
"""

from __future__ import annotations

import glob
import json
import os

import pytest
from jobrun import assert_same_outputs, cli, committed, finish, logs, wait_for
from ray_nodes import LocalRayCluster, cluster_env, cmdline, descendants, write_token

pytestmark = [pytest.mark.faults, pytest.mark.long, pytest.mark.timeout(1200)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES: dict = {"node_kills": []}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("node-loss")
    env = cluster_env(write_token(str(d / "token")), {"PYTHONPATH": ROOT})
    with LocalRayCluster(str(d), env) as c:
        c.start_head(num_cpus=2)
        yield c, env
    path = os.environ.get("SHARDSMITH_FAULT_FIGURES")
    if path:
        old = json.load(open(path)) if os.path.exists(path) else {}
        json.dump({**old, **FIGURES}, open(path, "w"), indent=1)


def with_worker(c: LocalRayCluster) -> int:
    """Index of a live worker node, started if there is none (an earlier test killed it)."""
    live = [i for i, (p, _) in enumerate(c.nodes) if i > 0 and p.pid not in c.killed]
    if live:
        return live[0]
    c.wait_for_exactly(1)  # the killed node is declared dead first
    c.add_node(num_cpus=1)
    return len(c.nodes) - 1


def on_node(c: LocalRayCluster, index: int, what: str) -> list[int]:
    return [p for p in descendants(c.nodes[index][0].pid) if what in cmdline(p)]


def worker_id(c: LocalRayCluster) -> str:
    ids = [n["node_id"] for n in c.alive_nodes() if not n.get("is_head_node")]
    assert len(ids) == 1, ids
    return ids[0]


def shards_by(out, node: str) -> int:
    """Committed shards whose rows were produced (scored, generated) on ``node``."""
    n = 0
    for path in glob.glob(os.path.join(str(out), "_ledger", "*.json")):
        try:
            entry = json.load(open(path))
        except ValueError:
            continue
        n += node in entry.get("node_ids", [])
    return n


def lose_the_worker_mid_run(c, env, args, out, total: int, actor: str, log_base) -> dict:
    """Run ``args``; once the worker node has produced the rows of a committed shard, runs a model
    actor and shards remain, kill that node; if the run stopped, rerun it. Returns what happened."""
    worker = with_worker(c)
    node = worker_id(c)
    proc = cli(args, env, log_base)
    ready = wait_for(lambda: shards_by(out, node) >= 1 and on_node(c, worker, actor) and committed(out) < total - 1,
                     600, proc)
    assert ready, "the worker node never did committed work mid-run:\n" + logs(proc)[1][-3000:]
    at_kill = committed(out)
    assert 0 < at_kill < total, at_kill  # the kill lands in the middle of the run, on a node that did work
    c.kill_node(worker)
    code, _, err = finish(proc, timeout=900)
    outcome = {"job": args[0].rsplit(".", 1)[-1], "committed_at_kill": at_kill, "total_shards": total,
               "worker_shards_at_kill": shards_by(out, node), "first_exit_code": code}
    if code != 0:
        last = err.strip().splitlines()[-1]
        assert "error:" in last and "rerun" in last.lower(), last  # one clear line, saying what to do
        outcome["message"] = last
        c.wait_for_exactly(1)
        code, stdout, err = finish(cli(args, env, f"{log_base}-rerun"), timeout=900)
        assert code == 0, err[-3000:]
        assert "already committed" in stdout
        outcome["resumed"] = True
    FIGURES["node_kills"].append(outcome)
    return outcome


def test_curate_loses_its_worker_node_and_ends_equal_to_a_clean_run(cluster, tiny_models, tmp_path):
    from s3_server import model_flags

    from shardsmith.jobs.sample_data import make_sample_data

    c, env = cluster
    data = make_sample_data(str(tmp_path / "data"), shards=16, per_shard=8, metadata_files=1, metadata_rows=10,
                            max_size=160, seed=21)

    def args(out):
        return ["shardsmith.jobs.curate", data["images"], str(out), "--address", c.gcs_address, "--no-report", "--quiet",
                *model_flags(tiny_models), "--batch-size", "4"]

    with_worker(c)
    ref = tmp_path / "ref"
    code, _, err = finish(cli(args(ref), env, tmp_path / "ref"))
    assert code == 0, err[-3000:]
    assert len(json.load(open(ref / "stats.json"))["node_ids"]) == 2  # the clean run used both nodes
    out = tmp_path / "out"
    lose_the_worker_mid_run(c, env, args(out), out, 16, "ScoreStage", tmp_path / "run")
    assert assert_same_outputs(ref, out) >= 128


def test_generate_loses_its_worker_node_and_ends_equal_to_a_clean_run(cluster, tiny_models, tmp_path):
    c, env = cluster
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}", "seed": i}) + "\n" for i in range(20)))

    def args(out):
        return ["shardsmith.jobs.generate", str(prompts), str(out), "--model", tiny_models["sd_model"], "--address",
                c.gcs_address, "--steps", "2", "--width", "64", "--height", "64", "--shard-size", "2",
                "--batch-size", "1", "--threads", "1", "--quiet"]

    with_worker(c)
    ref = tmp_path / "ref"
    code, _, err = finish(cli(args(ref), env, tmp_path / "ref"))
    assert code == 0, err[-3000:]
    out = tmp_path / "out"
    lose_the_worker_mid_run(c, env, args(out), out, 10, "GenerateStage", tmp_path / "run")
    assert_same_outputs(ref, out)
