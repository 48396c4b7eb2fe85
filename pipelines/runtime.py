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


def plan_resources(cpus: float, gpus: float, device: str = "auto", num_actors: int = 0,
                   actor_cpus: float = 0.0) -> ResourcePlan:
    if device == "auto":
        device = "cuda" if gpus >= 1 else "cpu"
    if device.startswith("cuda"):
        if gpus < 1:
            raise RuntimeError(f"device {device!r} requested but the Ray cluster has no GPU")
        n = num_actors or int(gpus)
        a_cpus = actor_cpus or min(1.0, max(cpus / max(n, 1) / 2, 0.25))
        return ResourcePlan(device, n, a_cpus, 1.0, max(1, int(a_cpus)), 0.5, 0.25, 0.25)
    # CPU: half the CPUs compute, the other half decode and read.
    a_cpus = actor_cpus or (1.0 if cpus >= 2 else max(cpus / 2, 0.25))
    n = num_actors or max(1, int(cpus // (2 * a_cpus)))
    threads = max(1, int(round(a_cpus)))
    return ResourcePlan("cpu", n, a_cpus, 0.0, threads, 0.5 if cpus >= 2 else 0.25, 0.25, 0.25)


def cluster_resources() -> tuple[float, float]:
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0))


def node_id() -> str:
    """The Ray node this process runs on (recorded in the stats to show where work ran)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return "local"
