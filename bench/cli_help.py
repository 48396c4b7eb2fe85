"""``cli_help_seconds``: how long ``shardsmith --help`` and ``shardsmith SUBCOMMAND --help`` take, as a
new process (what a user waits for), beside the bare interpreter's start on the same machine.

Each command is run ``runs`` times, alternating with ``python -c pass`` (the floor no CLI can beat):
the figure is the slowest command's median wall time (target <= 0.5 s). Each run's CPU seconds
(user + system, the children's rusage) are recorded too: on a loaded machine the wall time is mostly
waiting for a core, the CPU time is what the command itself costs. Each command's imports
are also listed with ``python -X importtime``: the heavy libraries (torch, Ray, pyarrow,
fsspec, open_clip, diffusers ...) must not be among them.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

from bench.measure import figure, median, say

HEAVY = ("torch", "ray", "pyarrow", "pyarrow.compute", "fsspec", "open_clip", "diffusers", "transformers", "numpy",
         "PIL", "yaml", "urllib3", "matplotlib")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


CPU: dict[str, list[float]] = {}  # command line -> user + system seconds of each run (load-independent)


def wall(argv: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=ROOT, timeout=60)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.setdefault(" ".join(argv), []).append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    assert r.returncode == 0, (argv, r.stderr[-500:])
    return seconds


def heavy_imports(argv: list[str]) -> list[str]:
    r = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, env=_env(), cwd=ROOT, timeout=60)
    names = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    return sorted(n for n in names if n in HEAVY)


def run(runs: int = 7) -> dict:
    from shardsmith.jobs.cli import COMMANDS

    py = sys.executable
    commands = {"(none)": [py, "-m", "shardsmith", "--help"],
                **{name: [py, "-m", "shardsmith", name, "--help"] for name in COMMANDS}}
    base, per = [], {name: [] for name in commands}
    wall([py, "-c", "pass"])
    for argv in commands.values():  # warm the page cache and the bytecode
        wall(argv)
    for _ in range(runs):
        base.append(wall([py, "-c", "pass"]))
        for name, argv in commands.items():
            per[name].append(wall(argv))
    medians = {name: median(v) for name, v in per.items()}
    cpu = {name: median(CPU[" ".join(argv)][-runs:]) for name, argv in commands.items()}
    heavy = {name: heavy_imports(argv) for name, argv in commands.items()}
    slowest = max(medians, key=medians.get)
    for name in commands:
        say(f"  shardsmith {'' if name == '(none)' else name} --help: median {medians[name]:.3f} s "
            f"({cpu[name]:.3f} s CPU)"
            + (f"; imports {', '.join(heavy[name])}" if heavy[name] else ""))
    return {"cli_help_seconds": figure(
        medians[slowest], 0.5, higher_is_better=False, slowest=slowest, median_seconds={k: round(v, 3) for k, v in medians.items()},
        cpu_seconds={k: round(v, 3) for k, v in cpu.items()},
        python_start_seconds=round(median(base), 3),
        python_start_cpu_seconds=round(median(CPU[" ".join([py, "-c", "pass"])][-runs:]), 3), heavy_imports={k: v for k, v in heavy.items() if v},
        runs=runs, what="value = the slowest subcommand's median wall time of `python -m shardsmith CMD --help` "
                        "as a new process; python_start_seconds = `python -c pass` measured between them",
        included="process start, interpreter, imports, argparse, printing the help")}
