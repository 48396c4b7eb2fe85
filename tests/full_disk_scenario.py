"""The full-disk scenario of tests/test_full_disk.py, run inside a private mount namespace
(``unshare --mount``, or ``unshare -rm`` without root), so that the small tmpfs it mounts is seen
by this process and its children only and disappears with them, whatever happens.

    python tests/full_disk_scenario.py WORK RESULT.json -- CURATE ARGS (without OUTPUT)

0. a Ray cluster (tests/ray_nodes.py) started in the namespace, so its workers see the tmpfs;
1. a clean curate run into WORK/ref (an ordinary folder);
2. a tmpfs at WORK/mnt, sized to what about 2.5 of the run's shards need (from the clean run's
   files) plus a filler file that takes the rest;
3. the same curate run into WORK/mnt/out: it must stop with exit 2 and one line naming the path;
4. the filler is removed (space freed) and the run is started again: it must resume and finish;
5. WORK/mnt/out is copied to WORK/out for the test to compare with WORK/ref; RESULT.json gets
   the exit codes, the messages and what was committed when the disk was full.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ray_nodes import LocalRayCluster, cluster_env, write_token  # noqa: E402

PAGE = 4096
ENV: dict = {}


def run(args: list[str], log: str) -> tuple[int, str, str]:
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        code = subprocess.call([sys.executable, "-m", *args], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                               env=ENV)
    with open(f"{log}.out") as out, open(f"{log}.err") as err:
        return code, out.read(), err.read()


def pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def shard_bytes(ref: str) -> dict[str, int]:
    """Bytes (in whole pages, as tmpfs counts them) each shard's files take."""
    sizes: dict[str, int] = {}
    for root, _, names in os.walk(ref):
        for n in names:
            if n.endswith((".parquet", ".tar")) or root.endswith("_ledger"):
                shard = n.split(".")[0]
                sizes[shard] = sizes.get(shard, 0) + pages(os.path.getsize(os.path.join(root, n)))
    return sizes


def main() -> int:
    work, result_path = sys.argv[1], sys.argv[2]
    ENV.update(cluster_env(write_token(os.path.join(work, "token"))))
    with LocalRayCluster(work, ENV) as cluster:
        cluster.start_head(num_cpus=2)
        job = [*sys.argv[sys.argv.index("--") + 1:], "--address", cluster.gcs_address]
        return scenario(work, result_path, job)


def scenario(work: str, result_path: str, job: list[str]) -> int:
    result: dict = {}
    code, _, err = run([job[0], job[1], os.path.join(work, "ref"), *job[2:]], os.path.join(work, "ref"))
    assert code == 0, err[-3000:]
    sizes = shard_bytes(os.path.join(work, "ref"))
    mean = sum(sizes.values()) / len(sizes)
    manifest = pages(os.path.getsize(os.path.join(work, "ref", "manifest.json")))
    budget = pages(int(2.5 * mean)) + manifest + 4 * PAGE  # ~2.5 shards, the manifest, lease and probe
    filler = 4 * 1024 * 1024
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    subprocess.check_call(["mount", "-t", "tmpfs", "-o", f"size={budget + filler}", "tmpfs", mnt])
    with open(os.path.join(mnt, "filler"), "wb") as f:
        f.write(b"\0" * filler)
    out = os.path.join(mnt, "out")
    code, _, err = run([job[0], job[1], out, *job[2:]], os.path.join(work, "full"))
    result.update(full_code=code, full_err=err[-4000:], shard_bytes=sizes, budget=budget,
                  committed_when_full=sorted(os.listdir(os.path.join(out, "_ledger")))
                  if os.path.isdir(os.path.join(out, "_ledger")) else [],
                  files_when_full=sorted(os.path.relpath(os.path.join(r, n), out)
                                         for r, _, ns in os.walk(out) for n in ns))
    shutil.copytree(out, os.path.join(work, "out-when-full"))
    os.remove(os.path.join(mnt, "filler"))  # space freed
    code, stdout, err = run([job[0], job[1], out, *job[2:]], os.path.join(work, "rerun"))
    result.update(rerun_code=code, rerun_out=stdout[-4000:], rerun_err=err[-4000:])
    shutil.copytree(out, os.path.join(work, "out"))
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
