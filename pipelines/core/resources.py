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


# Library messages that say nothing to a user of a job, silenced where they are made (a filter on
# the logger that emits them, matching these texts only); every other warning is kept.
QUIET_MESSAGES = {
    # a local one-process cluster keeps Ray's token authentication on; the line says how to turn it off
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled for this Ray",),
    # we turn Ray Data's own bars off: the job prints its own progress (core/progress.py)
    "ray.data._internal.progress": ("Progress bars disabled", "Progress bars for operators disabled"),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_library_noise() -> None:
    """Install the QUIET_MESSAGES filters (once per process)."""
    for name, prefixes in QUIET_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


@contextmanager
def _stderr_to_devnull():
    import sys

    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_RESTART_WARNING_SPENT = False


def spend_actor_restart_warning() -> None:
    """Ray's core worker prints, once per process, an ERROR line when an actor that may restart
    gets an argument by reference ("has constructor arguments in the object store and max_restarts
    > 0", ray-project/ray#53727). Ray Data's actor pools always do (its context and UDF are passed
    as ObjectRefs, which the operator holds for its lifetime, so a restart finds them): the line is
    about Ray Data's internals, not the job. It is spent here on a throwaway actor, with this
    process's stderr pointed at /dev/null for that one call; the actor is killed at once."""
    global _RESTART_WARNING_SPENT
    if _RESTART_WARNING_SPENT:
        return
    import ray

    _RESTART_WARNING_SPENT = True
    ref = ray.put(0)
    # a resource no node has: the actor is never scheduled (no worker starts), and it is removed
    # before Ray would call it infeasible
    with _stderr_to_devnull():
        actor = ray.remote(num_cpus=0, max_restarts=1, resources={"shardsmith_never_scheduled": 1})(_Spent)
        actor = actor.remote(ref)
    ray.kill(actor, no_restart=True)


class _Spent:
    def __init__(self, _):
        pass


@contextmanager
def ray_session(address: str | None = None, quiet: bool = True):
    import ray

    quiet_library_noise()
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
        spend_actor_restart_warning()
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
    decode_in_actor: bool = False  # CPU: each actor decodes its images between forwards (see _cpu_node_plan)

    def describe(self) -> str:
        where = "decoding in the actors" if self.decode_in_actor else "decoding in CPU tasks"
        return (f"{self.num_actors} model actor(s) on {self.device} "
                f"({self.actor_cpus:g} CPU, {self.actor_gpus:g} GPU, {self.torch_threads} torch threads each; {where})")


# Ray remote args for the CPU task stages that feed an actor pool (read, decode). Ray Data fuses a
# task stage into the actor stage after it when their remote args are equal -- on a cluster of
# 1-CPU nodes the plan gives both 0.5 CPU -- and the reads and decodes then run inside the scoring
# actors, one after the other with the model, each actor reading a whole group of shards: measured
# on 2 local nodes, one actor scored everything while the other idled (bench/scaleout.py). Stating
# Ray's own default for tasks (``max_calls=0``: a worker is never recycled) makes the args differ,
# so the stages stay apart.
TASK_STAGE_ARGS = {"max_calls": 0}


def actor_pool(num_actors: int, initial_size: int | None = None, max_tasks_in_flight_per_actor: int | None = None):
    """The Ray Data actor pool of a model stage (scoring, diffusion): one call at a time per actor,
    run on the actor's main thread, the thread that loaded the model.

    By default Ray Data runs a callable class's ``__call__`` in a one-thread executor of its own
    while ``__init__`` ran on the main thread. torch's intra-op threads are set up per calling
    thread, and a forward from that second thread ran far below the same forward in a plain
    process: tiny-SD at bf16, 12 steps at 256 px on this 2-core node, 1.86-2.36 s per image in the
    executor thread against 1.34-1.46 s on the main thread, the same as a direct loop (1.30-1.45 s;
    a py-spy dump showed the executor thread busy and the main thread waiting on its future).
    ``enable_true_multi_threading`` turns the wrapper off; with Ray's default ``max_concurrency`` of
    1 the actor still runs one call at a time.

    ``initial_size``: the pool starts that large and never shrinks below it while inputs remain.
    Ray Data's autoscaler otherwise scales a pool down to ``min_size`` when its actors look
    under-used or over the operator's resource budget; on the 2-node scale-out bench a pool of
    two (one actor per node) ran with one actor doing every batch in three runs of three."""
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(min_size=initial_size or 1, max_size=num_actors, initial_size=initial_size,
                             max_tasks_in_flight_per_actor=max_tasks_in_flight_per_actor,
                             enable_true_multi_threading=True)


THREADS_PER_CPU_ACTOR = 8  # a node with more cores gets more actors (each holds a copy of the model)


def _cpu_node_plan(c: float) -> tuple[int, float, int]:
    """(actors, CPUs per actor, torch threads per actor) for a CPU node with ``c`` logical CPUs.

    The whole node serves the model: the actors' torch threads together take every core, and each
    actor decodes its own images, in a thread pool of the same size, between its forwards
    (``stages/score.py``). Decoding interleaved with the model, rather than beside it in other
    processes, is what keeps a multi-threaded forward from stalling: a forward whose threads wait
    for each other at every op loses far more than the decode takes whenever another process holds
    one of its cores (bench/: a 2-thread forward ran 1.5x a 1-thread one, not 2x, while decode
    tasks ran beside it). Half a CPU is left to the read and write tasks (tar streaming and
    parquet: little CPU, but an actor holding the whole node would starve them: a hang)."""
    n = max(1, round(c / THREADS_PER_CPU_ACTOR))
    threads = max(1, int(c // n))
    reserve = 0.5 if c >= 1 else c / 2
    return n, max(c - reserve, 0.25) / n, threads


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
        return ResourcePlan(device, n, a_cpus, 1.0, max(1, int(a_cpus)), 0.5, 0.25, 0.25, decode_in_actor=False)
    per_node = [_cpu_node_plan(c) for c in (nodes or [cpus]) if c > 0] or [_cpu_node_plan(cpus)]
    # one actor size for the pool (Ray Data's actors are alike): the smallest node's
    a_cpus = actor_cpus or min(a for _, a, _ in per_node)
    n = num_actors or sum(k for k, _, _ in per_node)
    threads = min(t for _, _, t in per_node) if not actor_cpus else max(1, int(round(actor_cpus)))
    return ResourcePlan("cpu", n, a_cpus, 0.0, threads, 0.5 if cpus >= 2 else 0.25, 0.25, 0.25, decode_in_actor=True)


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
