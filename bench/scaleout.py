"""Figure 6: scale-out. curate on a local Ray cluster of two nodes with 1 CPU each, over one node
with 1 CPU, same data, same settings.

"1 CPU" is made physical: each node's processes (``ray start`` and everything it spawns: raylet,
workers, actors) are pinned to one core of their own with ``sched_setaffinity`` — on a 2-core
machine a "1-CPU" node would otherwise run its actor on one core and its decode tasks on the
other. The driver (``bench.scaleout_driver``, a separate process like a job's driver) is not
pinned: it is the same in both runs. Nodes come from ``tests/ray_nodes.py`` (loopback, token
auth, free ports, stopped by process group); their workers run at niceness 0 like a local Ray of
shardsmith's (``shardsmith.pipelines.core.resources.LOCAL_SYSTEM_CONFIG``).

Two numbers per run: end-to-end (the driver's ``run_curate()`` wall time) and steady-state
throughput (rows reaching the driver while every scoring actor is busy, over that window; see
``bench/scaleout_driver.py``), which leaves out what does not scale with nodes -- connecting, the
actors' model load -- and is the figure. The sides alternate: 1 node, 2 nodes, 1 node; the 2-node
rate is compared with the mean of the 1-node runs around it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.measure import figure, say

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cluster_class():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import ray_nodes

    class PinnedCluster(ray_nodes.LocalRayCluster):
        """Each node started on the next core of ``cores``."""

        def __init__(self, *a, cores: list[int], **k):
            super().__init__(*a, **k)
            self.cores = list(cores)

        def _spawn(self, args, name):
            core = self.cores[len(self.nodes) % len(self.cores)]

            def pin():
                ray_nodes.die_with_parent()
                os.sched_setaffinity(0, {core})

            log = open(os.path.join(self.log_dir, f"{name}.log"), "wb")
            proc = subprocess.Popen([ray_nodes.RAY, "start", *args], env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=pin)
            self.nodes.append((proc, log))
            return proc

    return ray_nodes, PinnedCluster


def one_run(nodes: int, work: str, inputs: str, heads: dict, batch: int) -> dict:
    ray_nodes, PinnedCluster = _cluster_class()
    cores = sorted(os.sched_getaffinity(0))[:2]
    log_dir = os.path.join(work, f"cluster-{nodes}")
    os.makedirs(log_dir, exist_ok=True)
    token = ray_nodes.write_token(os.path.join(log_dir, "token"))
    env = ray_nodes.cluster_env(token, extra={"RAY_worker_niceness": "0"})
    with PinnedCluster(log_dir, env, object_store_bytes=300 * 1024**2, cores=cores) as cluster:
        cluster.start_head(num_cpus=1)
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        say(f"  {nodes} node(s) up, 1 CPU each, pinned to cores {cores[:nodes]}")
        out = os.path.join(work, f"scaleout-out-{nodes}")
        cmd = [sys.executable, "-m", "bench.scaleout_driver", "--address", cluster.gcs_address, "--input", inputs,
               "--output", out, "--heads", json.dumps(heads), "--batch-size", str(batch)]
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"scale-out driver failed ({p.returncode}):\n{p.stderr[-3000:]}")
        result = json.loads(p.stdout.strip().splitlines()[-1])
    say(f"  {nodes} node(s): {result['images']} images, end to end {result['seconds']:.1f} s = "
        f"{result['images_per_s']:.2f} images/s; steady {result['steady_images_per_s']:.2f} images/s "
        f"({result['scoring_actors']} scoring actor(s) on {result['nodes_used']} node(s))")
    return result


def run(info: dict, shards: int, heads: dict, work: str, batch: int) -> dict:
    from bench.data import shard_urls

    inputs = shard_urls(info, 0, shards)
    one = [one_run(1, work, inputs, heads, batch)]
    two = one_run(2, work, inputs, heads, batch)
    one.append(one_run(1, work, inputs, heads, batch))
    one_steady = (one[0]["steady_images_per_s"] + one[1]["steady_images_per_s"]) / 2
    one_e2e = (one[0]["images_per_s"] + one[1]["images_per_s"]) / 2
    steady = two["steady_images_per_s"] / one_steady
    return {"scale_out_2_nodes": figure(
        steady, 1.7, steady_images_per_s={"1_node": [round(r["steady_images_per_s"], 3) for r in one],
                                          "2_nodes": round(two["steady_images_per_s"], 3)},
        end_to_end_images_per_s={"1_node": [round(r["images_per_s"], 3) for r in one],
                                 "2_nodes": round(two["images_per_s"], 3)},
        end_to_end_ratio=round(two["images_per_s"] / one_e2e, 4), images=two["images"],
        runs={"1_node": one, "2_nodes": two},
        what="steady-state images/s on a 2-node local Ray cluster (1 CPU each, each node pinned to its own core) "
             "/ the mean of two runs on 1 node with 1 CPU (pinned to one core) before and after it; steady = rows "
             "reaching the driver while every scoring actor is busy / that window; end-to-end ratio beside it",
        included="curate driver in its own process (python -m bench.scaleout_driver --address ...), no report")}
