"""``shardsmith submit`` against a real 2-node Ray cluster on this machine, with inputs and outputs
on a real S3-compatible server.

The cluster: a head (``ray start --head``, dashboard on 127.0.0.1) and a second node with its own
CPU, both with token authentication, each in its own process group (tests/ray_nodes.py). The S3
credentials are in the nodes' environment, as an instance role or a Kubernetes Secret would put
them; the client that submits has none, and passes only the (non-secret) endpoint. The job must
succeed, score exactly like the same run on local files, record work on both nodes, leak no
credential, and leave no Ray process behind.

The first tests check the submission pieces without a cluster: entrypoints, the packaged working
directory (with Ray's own packager), the refusal of credentials in the runtime env, and the
runtime-env decision (cluster/preflight.py) on environments read by the probe's own code from this
venv and then altered (a package removed, a pin changed, another torch or Python). On the cluster
the main job takes the default path (the preflight job asks the nodes, they run this venv, so no
pip), a lock with one other pin gets exactly that pin (--dry-run: the decision and the runtime env,
nothing submitted), a lock pinning another torch is refused with exit 2, and a job whose runtime
env cannot be set up is reported as such.
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import read_scores
from ray_nodes import VENV_BIN, LocalRayCluster, cluster_env, group_alive, write_token
from s3_server import MotoServer, assert_same_scores, model_flags, s3_scores, small_sample_reference

from shardsmith.cluster import preflight as pf
from shardsmith.cluster import submit as cs

# Every wait below is bounded; the whole module stays under this even on a loaded 2-core machine.
pytestmark = pytest.mark.timeout(900)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "requirements.lock")
BUCKET = "shardsmith-cluster-test"
SHARDSMITH = os.path.join(VENV_BIN, "shardsmith")


# ---------------------------------------------------------------------------------------------
# Without a cluster
# ---------------------------------------------------------------------------------------------

def test_entrypoint_is_the_jobs_plain_module():
    assert cs.entrypoint("curate", ["s3://b/{0..9}.tar", "out dir", "--preset", "none"]) == \
        "python -m shardsmith.jobs.curate 's3://b/{0..9}.tar' 'out dir' --preset none"
    assert cs.entrypoint("generate", ["p.parquet", "out", "--model", "m"]).startswith("python -m shardsmith.jobs.generate ")
    assert cs.job_module("sample-data") == "shardsmith.jobs.sample_data"
    for bad in ("submit", "jobs", "../curate", "Curate", ""):
        with pytest.raises(cs.SubmitError):
            cs.job_module(bad)


def test_unknown_job_is_refused_before_contacting_a_cluster():
    r = subprocess.run([SHARDSMITH, "submit", "--address", "http://127.0.0.1:9", "--", "transmogrify", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "jobs/transmogrify.py" in r.stderr and "curate" in r.stderr


def test_packaged_working_dir_holds_the_code_but_no_weights_data_or_outputs(tmp_path):
    """Ray's own packager, given our runtime env's excludes, keeps only the code."""
    from ray._private.runtime_env.packaging import create_package

    proj = tmp_path / "proj"
    files = {
        "jobs/curate.py": "x", "pipelines/fs.py": "x", "cluster/ray-up/aws.yaml": "x", "README.md": "x",
        "pyproject.toml": "x", "requirements.lock": "x",
        "heads/aesthetic.pth": "w", "models/clip/tiny-clip.pt": "w", "weights.safetensors": "w",
        "demo-output/curated/00000.tar": "o", "data/part-00000.parquet": "d", ".venv/lib/torch.so": "v",
        ".git/HEAD": "g", "jobs/__pycache__/curate.cpython-311.pyc": "c",
    }
    for rel, content in files.items():
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).write_text(content)
    rt = cs.build_runtime_env(proj, pip=False, user={"excludes": ["secret-notes.txt"]})
    (proj / "secret-notes.txt").write_text("s")
    create_package(str(proj), tmp_path / "pkg.zip", include_gitignore=True, excludes=rt["excludes"])
    names = sorted(n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/"))
    assert names == sorted(["jobs/curate.py", "pipelines/fs.py", "cluster/ray-up/aws.yaml", "README.md",
                            "pyproject.toml", "requirements.lock"])


def lock_lines() -> dict[str, str]:
    """requirements.lock read here, by hand: canonical name -> the line as written."""
    out = {}
    for line in open(LOCK).read().splitlines():
        if "==" in line and not line.startswith("#"):
            out[re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()] = line.strip()
    return out


def write_lock(path, changes: dict[str, str]) -> str:
    """The project's lock with some lines replaced (name -> new line) or added."""
    lines = lock_lines()
    lines.update(changes)
    Path(path).write_text("\n".join(lines.values()) + "\n")
    return str(path)


def test_runtime_env_has_the_projects_requirements_and_user_overrides():
    rt = cs.build_runtime_env(ROOT, user={"env_vars": {"AWS_ENDPOINT_URL_S3": "http://minio:9000"},
                                          "excludes": ["scratch/"], "pip": ["extra==1.0"]})
    assert rt["working_dir"] == str(ROOT)
    assert rt["env_vars"] == {"PYTHONUNBUFFERED": "1", "AWS_ENDPOINT_URL_S3": "http://minio:9000"}
    assert "scratch/" in rt["excludes"] and "*.pth" in rt["excludes"]
    assert rt["pip"] == ["extra==1.0"]  # the user's file wins key by key
    reqs = cs.build_runtime_env(ROOT)["pip"]["packages"]  # --pip: every pinned runtime requirement
    lines = lock_lines()
    assert set(reqs) <= set(lines.values()), "exactly the lock's lines"
    assert lines["torch"] in reqs and lines["open-clip-torch"] in reqs and lines["ftfy"] in reqs
    assert not any(r.split("[")[0].split("=")[0] == "ray" for r in reqs), "the cluster's Ray is not reinstalled"
    assert lines["pytest"] not in reqs and lines["moto"] not in reqs, "test tools are not runtime requirements"
    assert "pip" not in cs.build_runtime_env(ROOT, pip=False)
    assert cs.build_runtime_env(ROOT, pip=["braceexpand==0.1.6"])["pip"] == {"packages": ["braceexpand==0.1.6"],
                                                                            "pip_check": False}


# ---------------------------------------------------------------------------------------------
# The runtime-env decision, on real environments read by the probe's own code
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def venv_env():
    """This venv as the probe sees a cluster node (the probe's code, run here)."""
    return pf.local_env()


def cluster_like(env: pf.ClusterEnv, drop=(), versions=None, **changes) -> pf.ClusterEnv:
    dists = {k: v for k, v in env.dists.items() if k not in drop}
    for k, ver in (versions or {}).items():
        dists[k] = (ver, dists[k][1])
    return pf.ClusterEnv(**{**env.__dict__, "dists": dists, **changes})


def decide(cluster, lock=LOCK, local=None):
    return pf.decide(cluster, pf.read_lock(lock), cs.project_requirements(Path(ROOT)), cs.requires_python(Path(ROOT)),
                     local)


def test_the_probe_reads_this_venv_as_it_is(venv_env):
    import importlib.metadata as md

    assert venv_env.python == platform.python_version()
    assert venv_env.version("torch") == md.version("torch") and venv_env.version("open_clip_torch") == "3.3.0"
    assert venv_env.torch_cuda == re.search(r"^cuda\b[^=]*=\s*'([^']+)'", md.distribution("torch").locate_file(
        "torch/version.py").read_text(), re.M).group(1)
    assert venv_env.virtualenv is True  # tests run from the project's .venv
    assert venv_env.markers["sys_platform"] == "linux"


def test_a_cluster_with_every_pin_gets_no_pip(venv_env):
    d = decide(venv_env, local=venv_env)
    assert (d.mode, d.pins, d.missing, d.different, d.refusal) == ("none", [], [], {}, None)
    checked = set(pf.runtime_closure(cs.project_requirements(Path(ROOT)), pf.read_lock(LOCK), [venv_env],
                                     venv_env.markers))
    assert d.checked == len(checked)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        direct = {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower().replace("_", "-")
                  for r in tomllib.load(f)["project"]["dependencies"]}
    assert direct - {"ray"} <= checked  # every direct dependency but Ray
    assert {"ftfy", "huggingface-hub", "tokenizers", "nvidia-cuda-runtime", "aiobotocore"} <= checked  # transitive ones
    assert not checked & {"ray", "pytest", "moto", "cfn-lint", "protobuf", "grpcio", "opencensus"}
    assert "no pip" in d.describe() and f"Python {platform.python_version()}" in d.describe()


def test_a_cluster_missing_one_requirement_gets_exactly_that_pin(venv_env, tmp_path):
    lines = lock_lines()
    for missing in ("ftfy", "braceexpand"):  # a transitive one (open_clip's), a direct one
        d = decide(cluster_like(venv_env, drop=[missing]), local=venv_env)
        assert (d.mode, d.pins, d.different) == ("pip", [lines[missing]], {}), missing
        assert d.missing == [lines[missing].split("==")[0]]
        rt = cs.build_runtime_env(ROOT, pip=d.pins)
        assert rt["pip"]["packages"] == [lines[missing]]
        assert f"pip will install: {lines[missing]}" in d.describe()
        assert any("virtualenv" in n for n in d.notes)  # this cluster's Python is a venv: Ray copies it
    # another pin in the lock (what the cluster has stays as it is): exactly that pin
    lock = write_lock(tmp_path / "other.lock", {"braceexpand": "braceexpand==0.1.6"})
    d = decide(venv_env, lock=lock, local=venv_env)
    assert (d.mode, d.pins) == ("pip", ["braceexpand==0.1.6"])
    assert d.different == {"braceexpand": (venv_env.version("braceexpand"), "0.1.6")}
    record = d.record()
    assert record["shardsmith_runtime_env"] == "pip" and record["shardsmith_pip"] == "braceexpand==0.1.6"
    assert json.loads(record["shardsmith_cluster"])["different"] == {
        "braceexpand": {"cluster": venv_env.version("braceexpand"), "lock": "0.1.6"}}


def test_another_torch_cuda_build_or_python_is_refused_naming_both_versions(venv_env, tmp_path):
    have = venv_env.version("torch")
    d = decide(venv_env, lock=write_lock(tmp_path / "t.lock", {"torch": "torch==2.13.0"}))
    assert d.refusal.startswith("torch: ") and have in d.refusal and "2.13.0" in d.refusal
    d = decide(cluster_like(venv_env, torch_cuda="12.8"))
    assert d.refusal.startswith("torch: ") and "CUDA 12.8" in d.refusal and "CUDA 13.0" in d.refusal
    d = decide(cluster_like(venv_env, torch_cuda=None))
    assert "without CUDA" in d.refusal and "CUDA 13.0" in d.refusal
    d = decide(cluster_like(venv_env, python="3.9.18"))
    assert d.refusal.startswith("python: ") and "3.9.18" in d.refusal and ">=3.10" in d.refusal
    assert "\n" not in d.refusal
    # torch missing altogether is not a mismatch: it is installed, and the line says what that costs
    d = decide(cluster_like(venv_env, drop=["torch"]), local=venv_env)
    assert d.refusal is None and lock_lines()["torch"] in d.pins and any("several GB" in n for n in d.notes)


def test_the_runtime_env_error_is_one_line():
    message = ("runtime_env setup failed: Failed to set up runtime environment.\n"
               "Traceback (most recent call last):\n  File \"/x/agent.py\", line 1, in _setup\n"
               "RuntimeError: Failed to execute command pip install ...\nCollecting nosuchpkg==0\n"
               "ERROR: Could not find a version that satisfies the requirement nosuchpkg==0 (from versions: none)\n"
               "ERROR: No matching distribution found for nosuchpkg==0\n")
    assert pf.runtime_env_error_line(message) == ("ERROR: Could not find a version that satisfies the requirement "
                                                  "nosuchpkg==0 (from versions: none)")
    assert pf.runtime_env_error_line("runtime_env setup failed: boom\nFileNotFoundError: [Errno 2] x.zip\n") == \
        "FileNotFoundError: [Errno 2] x.zip"


def test_credentials_are_refused_in_the_runtime_env(tmp_path):
    secret = "wJalrXUtnFEMI-do-not-print"
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN", "HF_TOKEN",
                 "DB_PASSWORD"):
        with pytest.raises(cs.SubmitError, match=name) as e:
            cs.parse_env_args([f"{name}={secret}"])
        assert secret not in str(e.value)
    allowed = cs.parse_env_args(["AWS_ENDPOINT_URL_S3=http://127.0.0.1:9000", "AWS_PROFILE=curation",
                                 "GOOGLE_APPLICATION_CREDENTIALS=/var/run/key.json", "AWS_SHARED_CREDENTIALS_FILE=/x"])
    assert set(allowed) == {"AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS",
                            "AWS_SHARED_CREDENTIALS_FILE"}
    env_file = tmp_path / "rt.yaml"
    env_file.write_text(f"env_vars:\n  AWS_SECRET_ACCESS_KEY: {secret}\n")
    r = subprocess.run([SHARDSMITH, "submit", "--runtime-env", str(env_file), "--address", "http://127.0.0.1:9",
                        "--", "curate", "in", "out"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "AWS_SECRET_ACCESS_KEY" in r.stderr and secret not in r.stderr + r.stdout


# ---------------------------------------------------------------------------------------------
# On a real 2-node cluster
# ---------------------------------------------------------------------------------------------

def run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_parallel(cmds: dict[str, tuple[list[str], dict]], timeout: float) -> dict[str, subprocess.CompletedProcess]:
    """Independent commands at once (each CLI start costs seconds on a busy 2-core machine)."""
    procs = {name: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for name, (cmd, env) in cmds.items()}
    deadline = time.monotonic() + timeout
    out = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


@pytest.fixture(scope="module")
def reference(ray_local, tiny_models, tmp_path_factory):
    return small_sample_reference(tmp_path_factory, tiny_models)


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, tiny_models, reference):
    """Everything that needs the live cluster happens here; the cluster is gone when tests look."""
    base = tmp_path_factory.mktemp("two-nodes")
    sample = reference["sample"]
    # (decode_batch_size only matters on GPUs, where decode is a stage of its own: a config file
    # the job reads, from the client's disk)
    config = base / "curate.yaml"
    config.write_text("decode_batch_size: 10\n")
    token = write_token(str(base / "ray-token"))
    result: dict = {"sample": sample, "config": str(config)}
    t0 = time.monotonic()
    timings = result["timings"] = {}
    with MotoServer(str(base / "moto.log")) as s3:
        s3.upload_dir(sample["images"], f"s3://{BUCKET}/in/images")
        node_env = cluster_env(token, extra=s3.credentials)  # the nodes hold the credentials
        client_env = cluster_env(token)  # the client has none
        with LocalRayCluster(str(base), node_env) as cluster:
            cluster.start_head(num_cpus=1)
            cluster.add_node(num_cpus=1)
            timings["cluster_up_s"] = round(time.monotonic() - t0, 1)
            result["pgids"] = [p.pid for p, _ in cluster.nodes]
            result["temp_dirs"] = list(cluster.temp_dirs)
            result["nodes"] = cluster.alive_nodes()
            addr = ["--address", cluster.dashboard_url]
            # The default path: no --no-pip, the preflight job decides (these nodes run this venv).
            result["submit"] = run(
                [SHARDSMITH, "submit", *addr, "--timeout", "360",
                 "--env", f"AWS_ENDPOINT_URL_S3={s3.endpoint}", "--",
                 "curate", f"s3://{BUCKET}/in/images", f"s3://{BUCKET}/out", *model_flags(tiny_models),
                 "--num-actors", "2", "--actor-cpus", "0.25", "--config", str(config)],
                client_env, timeout=420)
            timings["job_done_s"] = round(time.monotonic() - t0, 1)
            job_id = result["submit"].stdout.strip().splitlines()[0] if result["submit"].stdout.strip() else ""
            result["job_id"] = job_id
            endpoint = ["--env", f"AWS_ENDPOINT_URL_S3={s3.endpoint}"]
            # A job to stop while it starts.
            started = run([SHARDSMITH, "submit", *addr, "--no-pip", "--no-wait", *endpoint, "--",
                           "curate", f"s3://{BUCKET}/in/images", f"s3://{BUCKET}/out-stopped",
                           *model_flags(tiny_models)], client_env, timeout=120)
            stop_id = started.stdout.strip().splitlines()[0] if started.stdout.strip() else "none"
            wrong = write_token(str(base / "wrong-token"))
            curate = ["--", "curate", f"s3://{BUCKET}/in/images", f"s3://{BUCKET}/out-unused", *model_flags(tiny_models)]
            bad_env = base / "bad-runtime-env.yaml"  # a py_modules package that is not there
            bad_env.write_text(f"py_modules: ['file://{base}/no-such-package.zip']\n")
            result["bad_env_path"] = f"{base}/no-such-package.zip"
            result.update(run_parallel({
                # one pin the cluster does not have (braceexpand 0.1.6): exactly that one in pip
                "one_other_pin": ([SHARDSMITH, "submit", *addr, "--dry-run", *endpoint, "--requirements-lock",
                                   write_lock(base / "other.lock", {"braceexpand": "braceexpand==0.1.6"}), *curate],
                                  client_env),
                # another torch than the cluster's: refused before submitting
                "other_torch": ([SHARDSMITH, "submit", *addr, *endpoint, "--requirements-lock",
                                 write_lock(base / "torch.lock", {"torch": "torch==2.13.0"}), *curate], client_env),
                "forced_pip": ([SHARDSMITH, "submit", *addr, "--pip", "--dry-run", *endpoint, *curate], client_env),
                "runtime_env_failure": ([SHARDSMITH, "submit", *addr, "--no-pip", "--timeout", "180", *endpoint,
                                         "--runtime-env", str(bad_env), *curate], client_env),
                "stop": ([SHARDSMITH, "jobs", "stop", "--wait", *addr, stop_id], client_env),
                # a job that fails (no input there): submit exits with the job's own exit code
                "failing": ([SHARDSMITH, "submit", *addr, "--no-pip", "--timeout", "180", *endpoint, "--",
                             "curate", f"s3://{BUCKET}/missing", f"s3://{BUCKET}/out-missing"], client_env),
                "status": ([SHARDSMITH, "jobs", "status", *addr, job_id], client_env),
                "list": ([SHARDSMITH, "jobs", "list", *addr], client_env),
                "logs": ([SHARDSMITH, "jobs", "logs", *addr, job_id], client_env),
                "unauthenticated": ([SHARDSMITH, "jobs", "list", *addr], cluster_env(wrong)),
            }, timeout=240))
            result["stopped_status"] = run([SHARDSMITH, "jobs", "status", *addr, stop_id], client_env, 60)
            # --timeout: the job is stopped and submit exits 124
            result["timeout"] = run([SHARDSMITH, "submit", *addr, "--no-pip", "--timeout", "3", *endpoint, *curate],
                                    client_env, timeout=120)
            timeout_id = (result["timeout"].stdout.strip().splitlines() or ["none"])[0]
            result["timeout_stop"] = run([SHARDSMITH, "jobs", "stop", "--wait", *addr, timeout_id], client_env, 120)
            result["timeout_status"] = run([SHARDSMITH, "jobs", "status", *addr, timeout_id], client_env, 60)
            # Ctrl-C once the job is submitted (its id printed): submit exits 130, the job keeps running
            proc = subprocess.Popen([SHARDSMITH, "submit", *addr, "--no-pip", *endpoint, *curate], env=client_env,
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            interrupted_id = proc.stdout.readline().strip()
            streamed = proc.stdout.readline()  # the job's first log line: submit is following the job now
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
            result["ctrl_c"] = subprocess.CompletedProcess(proc.args, proc.returncode,
                                                           interrupted_id + "\n" + streamed + out, err)
            result["ctrl_c_status"] = run([SHARDSMITH, "jobs", "status", *addr, interrupted_id], client_env, 60)
            run([SHARDSMITH, "jobs", "stop", "--wait", *addr, interrupted_id], client_env, 120)
            timings["exit_code_checks_s"] = round(time.monotonic() - t0, 1)
            timings["queries_done_s"] = round(time.monotonic() - t0, 1)
        timings["cluster_stopped_s"] = round(time.monotonic() - t0, 1)
        (base / "timings.json").write_text(json.dumps(timings))  # where the time goes, for slow machines
        fs = s3.filesystem()
        result["stats"] = json.loads(fs.cat_file(f"{BUCKET}/out/stats.json"))
        result["scores"] = s3_scores(fs, f"{BUCKET}/out")
        result["outputs"] = {f: fs.cat_file(f) for f in fs.find(f"{BUCKET}/out")}
        result["secrets"] = (s3.secret_key, s3.access_key)
    return result


def test_submitted_curate_job_succeeds_and_streams_its_logs(two_node_run):
    r = two_node_run["submit"]
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    job_id = two_node_run["job_id"]
    assert job_id.startswith("shardsmith-curate-")
    assert "curate summary" in r.stdout and "TOTAL    40" in r.stdout  # the job's own output, streamed
    assert f"job {job_id} SUCCEEDED" in r.stderr


def test_the_default_path_asked_the_cluster_and_installed_nothing(two_node_run):
    """The nodes run this venv: every pin is there, so no pip (Ray would copy the 6.8 GB venv to make one)."""
    r = two_node_run["submit"]
    assert "asking the cluster what it has" in r.stderr
    line = next(ln for ln in r.stderr.splitlines() if "pinned runtime requirements" in ln)
    assert f"cluster: Python {platform.python_version()} (a virtualenv" in line and "-> no pip (asked in " in line
    assert "runtime env: " in r.stderr and "pip: none" in r.stderr
    recorded = json.loads(two_node_run["status"].stdout)["metadata"]  # in Ray's job table
    assert recorded["shardsmith_runtime_env"] == "none" and recorded["shardsmith_pip"] == ""
    seen = json.loads(recorded["shardsmith_cluster"])
    assert seen["python"] == platform.python_version() and seen["missing"] == [] and seen["different"] == {}
    import importlib.metadata as md

    import torch

    assert (seen["torch"], seen["torch_cuda"]) == (md.version("torch"), torch.version.cuda)


def test_a_cluster_without_one_pin_gets_exactly_that_one(two_node_run):
    r = two_node_run["one_other_pin"]
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(r.stdout)
    assert plan["runtime_env"]["pip"] == {"packages": ["braceexpand==0.1.6"], "pip_check": False}
    assert plan["decision"]["shardsmith_runtime_env"] == "pip"
    assert "pip will install: braceexpand==0.1.6" in r.stderr and "nothing submitted" in r.stderr
    forced = two_node_run["forced_pip"]
    assert forced.returncode == 0, forced.stderr[-3000:]
    pins = json.loads(forced.stdout)["runtime_env"]["pip"]["packages"]
    assert lock_lines()["torch"] in pins and "asking the cluster" not in forced.stderr


def test_another_torch_is_refused_before_submitting(two_node_run):
    import importlib.metadata as md

    r = two_node_run["other_torch"]
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("shardsmith submit: error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert errors[0].startswith("shardsmith submit: error: torch: the cluster has ")
    assert md.version("torch") in errors[0] and "2.13.0" in errors[0]
    assert r.stdout == "" and "submitted" not in r.stderr  # no job id: nothing went to the cluster


def test_a_job_that_fails_in_its_runtime_env_is_reported_as_such(two_node_run):
    r = two_node_run["runtime_env_failure"]
    assert r.returncode == 1, r.stderr[-3000:]
    (line,) = [ln for ln in r.stderr.splitlines() if "FAILED setting up its runtime env" in ln]
    assert "before the job ran" in line and "no-such-package.zip" in line, line
    assert "curate" not in r.stdout.split("\n", 1)[-1]  # the job's own code never ran


def test_submit_timeout_stops_the_job_and_exits_124(two_node_run):
    r = two_node_run["timeout"]
    assert r.returncode == 124, r.stderr[-3000:]
    assert "still running after 3 s; stopping it" in r.stderr
    assert json.loads(two_node_run["timeout_status"].stdout)["status"] == "STOPPED"


def test_ctrl_c_leaves_the_job_running_and_exits_130(two_node_run):
    r = two_node_run["ctrl_c"]
    job_id = r.stdout.splitlines()[0]
    assert job_id.startswith("shardsmith-curate-")
    assert r.returncode == 130, r.stderr[-3000:]
    assert f"interrupted; the job keeps running. Follow: shardsmith jobs logs --follow {job_id}" in r.stderr
    assert "Traceback" not in r.stderr
    assert json.loads(two_node_run["ctrl_c_status"].stdout)["status"] in ("PENDING", "RUNNING", "SUCCEEDED")


def test_jobs_commands_see_the_job(two_node_run):
    job_id = two_node_run["job_id"]
    status = two_node_run["status"]
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["status"] == "SUCCEEDED" and info["entrypoint"].startswith("python -m shardsmith.jobs.curate s3://")
    assert job_id in two_node_run["list"].stdout and "SUCCEEDED" in two_node_run["list"].stdout
    assert "curate summary" in two_node_run["logs"].stdout


def test_a_failed_job_fails_the_submit_command_with_its_exit_code(two_node_run):
    r = two_node_run["failing"]
    assert r.returncode == 2, f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}"  # curate's exit code for an input error
    assert "FAILED" in r.stderr and f"s3://{BUCKET}/missing" in r.stdout  # curate's own one-line error, streamed


def test_jobs_stop_stops_a_running_job(two_node_run):
    assert two_node_run["stop"].returncode == 0, two_node_run["stop"].stderr
    assert "stop requested" in two_node_run["stop"].stdout and "STOPPED" in two_node_run["stop"].stdout
    status = two_node_run["stopped_status"]
    assert json.loads(status.stdout)["status"] == "STOPPED" and status.returncode == 3


def test_the_cluster_refuses_a_client_without_its_token(two_node_run):
    r = two_node_run["unauthenticated"]
    assert r.returncode == 2
    assert "token" in r.stderr.lower() and "RAY_AUTH_TOKEN_PATH" in r.stderr


def test_work_ran_on_both_nodes(two_node_run):
    alive = {n["node_id"] for n in two_node_run["nodes"]}
    assert len(alive) == 2
    used = {nid for s in two_node_run["stats"]["shards"].values() for nid in s["node_ids"]}
    by = {k: s.get("scored_by") for k, s in two_node_run["stats"]["shards"].items()}
    by["plan"] = [line for line in two_node_run["submit"].stdout.splitlines() if line.startswith("ray:")]
    # node_ids: the nodes that read or scored a shard's rows. The read tasks spread over the nodes;
    # which actor scores a block is Ray Data's choice (an idle one; with two blocks and a fast
    # model, often the same one), so "scored on both" is a question of load (bench/scaleout.py).
    assert used == alive, f"scored on {sorted(used)}, cluster nodes {sorted(alive)}, shards scored by {by}"


def test_cluster_run_on_s3_scores_like_the_local_run(two_node_run, reference):
    """Same scores, counts and curated bytes as the same job run on local files in one process."""
    local = Path(reference["output"])
    assert_same_scores(two_node_run["scores"], read_scores(local))
    stats = two_node_run["stats"]
    for key in ("rows_read", "kept", "dropped", "errors", "dropped_by_reason", "errors_by_kind"):
        assert stats[key] == reference["stats"][key], key
    assert stats["rows_read"] == 40
    for name in ("00000", "00001"):
        local_tar = (local / "curated" / f"{name}.tar").read_bytes()
        assert two_node_run["outputs"][f"{BUCKET}/out/curated/{name}.tar"] == local_tar


def test_no_credential_in_outputs_or_logs(two_node_run):
    outputs = two_node_run["outputs"]
    assert any(f.endswith("manifest.json") for f in outputs)
    texts = [two_node_run[k].stdout + two_node_run[k].stderr for k in ("submit", "status", "logs", "failing")]
    for secret in two_node_run["secrets"]:
        assert not [f for f, data in outputs.items() if secret.encode() in data]
        assert not [t for t in texts if secret in t]


def test_no_ray_process_is_left_behind(two_node_run):
    assert not [g for g in two_node_run["pgids"] if group_alive(g)]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines() for d in two_node_run["temp_dirs"] if d in line]
