"""Connecting to Ray and sizing the work to the cluster's resources.

No address means a local Ray started for this process; ``--address`` (or ``RAY_ADDRESS``, which a
``ray job submit`` entrypoint has) joins an existing cluster. Actors get fractional CPUs on small
machines: on a 2-core node, two actors of one CPU each leave nothing for the read tasks and the
job hangs silently.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

# A local Ray runs the job's workers at the priority of the command that started it. Ray's default
# (niceness 15 for workers, 0 for the raylet and driver) makes all of curate's work - the model
# actors and the decode tasks - yield to every other process of the machine: on a shared 2-core
# machine under load, the scoring actor got a fraction of the CPU a plain Python loop gets (bench/).
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}


@contextmanager
def ray_session(address: str | None = None, quiet: bool = True):
    import ray

    started = False
    if not ray.is_initialized():
        kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or os.environ["RAY_ADDRESS"], **kwargs)
        else:
            ray.init(include_dashboard=False, _system_config=LOCAL_SYSTEM_CONFIG, **kwargs)
        started = True
    if quiet:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@dataclass(frozen=True)
class ResourcePlan:
    device: str
    num_actors: int
    actor_cpus: float
    actor_gpus: float
    torch_threads: int
    decode_cpus: float
    read_cpus: float
    write_cpus: float

    def describe(self) -> str:
        return (f"{self.num_actors} model actor(s) on {self.device} "
                f"({self.actor_cpus:g} CPU, {self.actor_gpus:g} GPU, {self.torch_threads} torch threads each)")


# Ray remote args for the CPU task stages that feed an actor pool (read, decode). Ray Data fuses a
# task stage into the actor stage after it when their remote args are equal -- on a cluster of
# 1-CPU nodes the plan gives both 0.5 CPU -- and the reads and decodes then run inside the scoring
# actors, one after the other with the model, each actor reading a whole group of shards: measured
# on 2 local nodes, one actor scored everything while the other idled (bench/scaleout.py). Stating
# Ray's own default for tasks (``max_calls=0``: a worker is never recycled) makes the args differ,
# so the stages stay apart.
TASK_STAGE_ARGS = {"max_calls": 0}

MAX_CPU_ACTORS_PER_NODE = 8  # each actor holds a copy of the model (ViT-L/14: 1.7 GB in fp32)


def _cpu_node_plan(c: float) -> tuple[int, float]:
    """(actors, CPUs per actor) for a CPU node with ``c`` logical CPUs.

    The model is nearly all of the work: decoding and resizing a 256-1024 px JPEG costs ~6 ms, one
    ViT-B/32 image + caption forward ~200 ms on one core (bench/), so one CPU's worth of read,
    decode and write tasks feeds many actors. The rest goes to actors of one thread each where
    possible: threads within one forward scale worse than processes (1.5x for 2 threads) and a
    multi-threaded forward stalls when another process takes one of its cores. On one CPU, half of
    it is left to the data tasks (an actor holding the whole CPU would starve them: a hang)."""
    reserve = 1.0 if c >= 2 else c / 2
    usable = max(c - reserve, 0.25)
    n = max(1, min(MAX_CPU_ACTORS_PER_NODE, int(usable)))
    return n, usable / n


def plan_resources(cpus: float, gpus: float, device: str = "auto", num_actors: int = 0,
                   actor_cpus: float = 0.0, nodes: list[float] | None = None) -> ResourcePlan:
    """``nodes``: the CPUs of each node (CPU actors are planned per node: a cluster of two 1-CPU
    nodes gets an actor on each); default one node with ``cpus``."""
    if device == "auto":
        device = "cuda" if gpus >= 1 else "cpu"
    if device.startswith("cuda"):
        if gpus < 1:
            raise RuntimeError(f"device {device!r} requested but the Ray cluster has no GPU")
        n = num_actors or int(gpus)
        a_cpus = actor_cpus or min(1.0, max(cpus / max(n, 1) / 2, 0.25))
        return ResourcePlan(device, n, a_cpus, 1.0, max(1, int(a_cpus)), 0.5, 0.25, 0.25)
    per_node = [_cpu_node_plan(c) for c in (nodes or [cpus]) if c > 0] or [_cpu_node_plan(cpus)]
    # one actor size for the pool (Ray Data's actors are alike): the smallest node's
    a_cpus = actor_cpus or min(a for _, a in per_node)
    n = num_actors or sum(k for k, _ in per_node)
    threads = max(1, int(round(a_cpus)))
    return ResourcePlan("cpu", n, a_cpus, 0.0, threads, 0.5 if cpus >= 2 else 0.25, 0.25, 0.25)


def cluster_resources() -> tuple[float, float]:
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0))


def node_cpus() -> list[float]:
    """The CPUs of each alive node of the connected cluster."""
    import ray

    return [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


def node_id() -> str:
    """The Ray node this process runs on (recorded in the stats to show where work ran)."""
    try:
        import ray

        if not ray.is_initialized():  # outside Ray (``shardsmith regenerate``): do not start one
            return "local"
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return "local"
