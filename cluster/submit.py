"""Submit shardsmith jobs to a Ray cluster through Ray's own job API, and watch them.

Every job is a plain module (``python -m shardsmith.jobs.<name> ARGS``), so what runs on the cluster is
exactly what runs on a laptop. ``submit`` packages the project folder as the job's working
directory (weights, data, outputs and virtualenvs excluded), asks the cluster what it has (a
preflight job, ``cluster/preflight.py``) and puts into the runtime env's ``pip`` exactly the pinned
requirements it lacks (none on a worker image built from ``cluster/Dockerfile``), reserves the
entrypoint's resources, then streams the job's logs and returns its status. Ray's job server does the scheduling, retries of the driver and log keeping: nothing
here is a scheduler.

Credentials never travel through the runtime env: Ray stores it in the cluster's job table and
shows it to anyone who can list jobs (dashboard, ``ray job list``). Object-store credentials come
from the nodes themselves (instance profile, workload identity, a Kubernetes Secret as env vars);
environment variables whose names look like secrets are refused here.

This module imports Ray's job SDK only (no torch, no model): a laptop without the model stack can
submit.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from shardsmith.cluster import preflight
from shardsmith.errors import ShardsmithError

# The job API is reached through a tunnel to the head (`ray dashboard CONFIG`, `kubectl
# port-forward`): port 8265 is never exposed publicly, so the default is the local tunnel end.
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCK_FILE = "requirements.lock"
PREFLIGHT_TIMEOUT_S = 180.0
# Runtime-env keys that choose the packages themselves: with one of these in --runtime-env, the
# user decides and the cluster is not asked.
PACKAGE_KEYS = ("pip", "uv", "conda")
# Runtime-env keys that choose which Python runs: the preflight job runs with them too.
PYTHON_KEYS = ("image_uri", "container", "py_executable", "env_vars")

# Never uploaded with the working directory: model weights, data shards, run outputs, caches and
# environments. Ray also honours the folder's .gitignore and .rayignore.
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", "env", ".pytest_cache", "__pycache__", "*.pyc", "*.egg-info",
    "demo-output", "bench/out", "bench/results.*", "out", "outputs", "models", "weights", "data",
    "*.pth", "*.pt", "*.bin", "*.ckpt", "*.safetensors", "*.onnx", "*.gguf", "*.npy", "*.npz",
    "*.tar", "*.tar.gz", "*.tgz", "*.zip", "*.parquet", "*.arrow", "*.jpg", "*.jpeg", "*.png", "*.webp",
]

# Names of environment variables that carry secrets: refused in the runtime env. Paths to
# credential files (..._FILE, ..._PATH) are not secrets and are allowed.
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|API_KEY|PRIVATE_KEY|SESSION|CREDENTIAL",
                          re.IGNORECASE)
_PATH_LIKE = ("_FILE", "_PATH", "_DIR")
_ALLOWED_NAMES = {"GOOGLE_APPLICATION_CREDENTIALS"}  # a path to a key file on the nodes

_JOB_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_NOT_SUBMITTABLE = {"submit", "jobs", "cli"}  # the submission commands themselves

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 3, 124, 130


class SubmitError(ShardsmithError, RuntimeError):
    """A problem found before or while talking to the cluster; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------

def job_module(name: str) -> str:
    """``curate`` -> ``shardsmith.jobs.curate``; ``sample-data`` -> ``shardsmith.jobs.sample_data``."""
    if not _JOB_NAME.match(name or ""):
        raise SubmitError(f"job name {name!r}: expected a shardsmith job such as curate, generate, augment")
    if name in _NOT_SUBMITTABLE:
        raise SubmitError(f"{name!r} is not a job that runs on the cluster")
    return "shardsmith.jobs." + name.replace("-", "_")


def entrypoint(name: str, args: list[str]) -> str:
    """The shell command Ray runs on the cluster: the job's plain module entry point."""
    return shlex.join(["python", "-m", job_module(name), *args])


def check_job_exists(working_dir: Path, name: str) -> None:
    """Fail here, not minutes later on the cluster, when the packaged folder lacks the job."""
    rel = Path(*job_module(name).split(".")[1:]).with_suffix(".py")  # shardsmith.jobs.X is jobs/X.py
    if not (working_dir / rel).is_file():
        have = sorted(p.stem.replace("_", "-") for p in (working_dir / "jobs").glob("*.py")
                      if not p.stem.startswith("_") and p.stem not in _NOT_SUBMITTABLE)
        raise SubmitError(f"{working_dir / rel}: no such job module in the working directory "
                          f"(jobs there: {', '.join(have) or 'none'})")


# ---------------------------------------------------------------------------------------------
# The runtime env
# ---------------------------------------------------------------------------------------------

def project_requirements(root: Path = PROJECT_ROOT) -> list[str]:
    """The project's runtime dependencies, from pyproject.toml.

    Ray is left out: the cluster already runs Ray, and a pip-installed Ray in the job's virtualenv
    would shadow the one its nodes run (``check_versions`` warns when that one is not the tested
    version)."""
    import tomllib

    path = root / "pyproject.toml"
    try:
        with open(path, "rb") as f:
            deps = tomllib.load(f)["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise SubmitError(f"{path}: cannot read [project].dependencies: {e}") from e
    return [d for d in deps if re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].strip().lower() != "ray"]


def requires_python(root: Path = PROJECT_ROOT) -> str | None:
    """pyproject's ``requires-python`` (the Pythons the project runs on), or None."""
    import tomllib

    try:
        with open(Path(root) / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["project"].get("requires-python")
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None


def is_secret_name(name: str) -> bool:
    if name in _ALLOWED_NAMES or name.upper().endswith(_PATH_LIKE):
        return False
    return bool(_SECRET_NAME.search(name))


def check_env_vars(env_vars: dict, source: str) -> None:
    secret = sorted(k for k in env_vars if is_secret_name(k))
    if secret:
        raise SubmitError(
            f"{source}: {', '.join(secret)} look(s) like a credential: the runtime env is stored in "
            "the cluster's job table and shown by the dashboard and `ray job list`, so secrets must not "
            "go there. Give the nodes their credentials instead (instance profile / IAM role, workload "
            "identity, or a Kubernetes Secret as env vars; see README, 'Running on a cluster')")


def parse_env_args(items: list[str], environ: dict | None = None) -> dict[str, str]:
    """``--env NAME=VALUE`` sets a value; ``--env NAME`` copies it from this shell."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise SubmitError(f"--env {item!r}: expected NAME=VALUE or NAME")
        if not sep:
            if name not in environ:
                raise SubmitError(f"--env {name}: not set in this shell (use --env {name}=VALUE)")
            value = environ[name]
        out[name] = value
    check_env_vars(out, "--env")
    return out


def load_runtime_env_file(path: str) -> dict:
    """A runtime env in YAML or JSON (the format ``ray job submit --runtime-env`` takes)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise SubmitError(f"--runtime-env {path}: cannot read: {e}") from e
    except yaml.YAMLError as e:
        raise SubmitError(f"--runtime-env {path}: not valid YAML/JSON: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SubmitError(f"--runtime-env {path}: expected a mapping (working_dir, pip, env_vars, ...), "
                          f"got {type(data).__name__}")
    return data


def lock_path(root: Path = PROJECT_ROOT) -> Path:
    return Path(root) / LOCK_FILE


def pinned_requirements(root: Path = PROJECT_ROOT, local: "preflight.ClusterEnv | None" = None) -> list[str]:
    """``--pip``: the lock's pins of every runtime requirement (the closure read from this machine's
    packages); the pyproject ranges when there is no lock."""
    roots = project_requirements(root)
    if not lock_path(root).is_file():
        return roots
    lock = preflight.read_lock(lock_path(root))
    return preflight.forced_pins(lock, roots, preflight.local_env() if local is None else local)


def build_runtime_env(working_dir: Path | str = PROJECT_ROOT, *, pip: bool | list[str] = True,
                      env_vars: dict | None = None, user: dict | None = None,
                      requirements_root: Path | None = None) -> dict:
    """The job's runtime env: the project folder, its requirements, unbuffered output.

    ``pip``: a list of requirements (what the preflight decided), True for every pinned runtime
    requirement (``--pip``), False or an empty list for none. ``user`` (from ``--runtime-env FILE``)
    wins key by key, except ``excludes`` (added to ours, so weights and outputs stay out) and
    ``env_vars`` (merged)."""
    env = {"PYTHONUNBUFFERED": "1", **(env_vars or {})}
    rt: dict = {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES), "env_vars": env}
    packages = pinned_requirements(requirements_root or Path(working_dir)) if pip is True else list(pip or [])
    if packages:
        rt["pip"] = {"packages": packages, "pip_check": False}
    for key, value in (user or {}).items():
        if key == "excludes":
            rt["excludes"] = rt["excludes"] + [e for e in value if e not in rt["excludes"]]
        elif key == "env_vars":
            rt["env_vars"] = {**rt["env_vars"], **value}
        else:
            rt[key] = value
    check_env_vars(rt["env_vars"], "runtime env env_vars")
    return rt


def describe_runtime_env(rt: dict) -> str:
    """One line about the runtime env, with env var names but never their values."""
    parts = [f"working_dir {rt.get('working_dir')}"]
    pip = rt.get("pip")
    if isinstance(pip, dict):
        parts.append(f"pip: {len(pip.get('packages', []))} requirement(s)")
    elif pip:
        parts.append(f"pip: {pip if isinstance(pip, str) else f'{len(pip)} requirement(s)'}")
    elif rt.get("uv") or rt.get("conda"):
        parts.append("uv" if rt.get("uv") else "conda")
    else:
        parts.append("pip: none (the cluster has the packages)")
    if rt.get("env_vars"):
        parts.append("env: " + ", ".join(sorted(rt["env_vars"])))
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Talking to the cluster
# ---------------------------------------------------------------------------------------------

def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS (if an http(s) URL), else the tunnel end."""
    if address:
        return address
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(var, "")
        if value.startswith(("http://", "https://")):
            return value
    return DEFAULT_ADDRESS


def redact(url: str) -> str:
    """An address fit to print: no user:password part."""
    return re.sub(r"//[^/@]*@", "//***@", url)


def enable_token_auth_if_token_available() -> None:
    """Do what ``ray.init`` does when it connects: if RAY_AUTH_MODE is unset but a token is there
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), use token authentication."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # another Ray version: the explicit RAY_AUTH_MODE=token still works
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def connect(address: str | None = None):
    """A ``JobSubmissionClient`` for the cluster, or a SubmitError that says how to fix it."""
    enable_token_auth_if_token_available()
    from ray.job_submission import JobSubmissionClient

    addr = resolve_address(address)
    try:
        return JobSubmissionClient(addr)
    except Exception as e:  # connection refused, auth, bad address...
        raise SubmitError(explain_connect_error(addr, e)) from e


def is_auth_error(e: Exception) -> bool:
    text = f"{type(e).__name__}: {e}"
    return any(m in text for m in ("401", "403", "Unauthorized", "Forbidden", "uthenticat"))


AUTH_HINT = ("the cluster uses Ray token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to a "
             "0600 file holding the cluster's token (on the head: `ray get-auth-token`; on KubeRay: the "
             "Secret named in authOptions)")
TUNNEL_HINT = ("is the tunnel to the head open? (`ray dashboard cluster/ray-up/aws.yaml`, or `kubectl "
               "port-forward svc/HEAD-SERVICE 8265:8265`), then --address http://127.0.0.1:8265")


def explain_connect_error(address: str, e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    first = text.splitlines()[0] if text else type(e).__name__
    hint = AUTH_HINT if is_auth_error(e) else TUNNEL_HINT
    return f"cannot use the Ray job API at {redact(address)}: {first[:300]}\n  {hint}"


def cluster_ray_version(client) -> str | None:
    """The Ray version the cluster runs (``/api/version``), or None if it does not say."""
    try:
        r = client._do_request("GET", "/api/version")
        return r.json().get("ray_version") if r.status_code == 200 else None
    except Exception:
        return None


def check_versions(client, log) -> None:
    """Warn when the cluster runs another Ray than the one the project is tested with: the job's
    code runs with the cluster's Ray, and the pinned requirements assume the tested one."""
    import ray

    remote = cluster_ray_version(client)
    if remote and remote != ray.__version__:
        log(f"warning: the cluster runs Ray {remote}, this project is tested with Ray {ray.__version__}; "
            "use the worker image from cluster/Dockerfile (same versions everywhere)")


# ---------------------------------------------------------------------------------------------
# What the cluster has: the preflight job, and the runtime env's packages that follow
# ---------------------------------------------------------------------------------------------

def run_preflight(client, user_env: dict | None = None, timeout: float = PREFLIGHT_TIMEOUT_S,
                  poll: float = 0.5) -> preflight.ClusterEnv:
    """Run the probe as a job of its own (``python -c PROBE``, no working dir, no pip: it sees the
    nodes' own Python, or the one ``--runtime-env`` chooses), read its report, delete the job."""
    probe_env = {k: v for k, v in (user_env or {}).items() if k in PYTHON_KEYS}
    job_id = f"shardsmith-preflight-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    skip = "--pip or --no-pip submit without asking"
    try:
        client.submit_job(entrypoint=shlex.join(preflight.probe_command()), submission_id=job_id,
                          runtime_env=probe_env or None, metadata={"shardsmith_job": "preflight"})
    except Exception as e:
        hint = f"\n  {AUTH_HINT}" if is_auth_error(e) else ""
        raise SubmitError(f"the job server refused the preflight job: {type(e).__name__}: {str(e)[:500]}{hint}") from e
    deadline = time.monotonic() + timeout
    try:
        while str(client.get_job_status(job_id).value) not in TERMINAL:
            if time.monotonic() > deadline:
                try:
                    client.stop_job(job_id)
                except Exception:
                    pass
                raise SubmitError(f"the preflight job {job_id} did not finish within {timeout:g} s (a busy or "
                                  f"scaling cluster? --preflight-timeout waits longer; {skip})")
            time.sleep(poll)
        info = client.get_job_info(job_id)
        logs = client.get_job_logs(job_id)
    finally:
        try:
            client.delete_job(job_id)
        except Exception:
            pass  # still stopping, or already gone: it only costs a row in `jobs list`
    if str(info.status.value) != "SUCCEEDED":
        why = preflight.runtime_env_error_line(info.message or "") if is_runtime_env_failure(info) else \
            ((info.message or "").strip().splitlines() or [""])[0][:300]
        raise SubmitError(f"the preflight job {info.status.value} on the cluster: {why} ({skip})")
    try:
        return preflight.parse_probe_output(logs)
    except preflight.PreflightError as e:
        raise SubmitError(f"{e} ({skip})") from e


def decide_packages(client, *, force: str | None = None, user_env: dict | None = None,
                    root: Path = PROJECT_ROOT, lock: Path | None = None,
                    timeout: float = PREFLIGHT_TIMEOUT_S) -> preflight.Decision:
    """The runtime env's ``pip``: forced (``--pip`` / ``--no-pip``), left to the user's
    ``--runtime-env`` (pip, uv or conda there), or decided by comparing the cluster with the lock.
    A refusal raises SubmitError (exit 2) with its one line."""
    if force == "none":
        return preflight.Decision(mode="forced-none")
    if force == "pip":
        return preflight.Decision(mode="forced-pip", pins=pinned_requirements(root))
    if any(k in (user_env or {}) for k in PACKAGE_KEYS):
        return preflight.Decision(mode="runtime-env")
    lock = Path(lock) if lock else lock_path(root)
    try:
        pins = preflight.read_lock(lock)
    except preflight.PreflightError as e:
        raise SubmitError(f"{e} (needed to check the cluster's packages; --pip or --no-pip submit without it)") from e
    cluster = run_preflight(client, user_env, timeout)
    try:
        local = preflight.local_env()
    except Exception:  # this machine's metadata only refines the closure; the cluster's suffices
        local = None
    decision = preflight.decide(cluster, pins, project_requirements(root), requires_python(root), local, lock.name)
    if decision.refusal:
        raise SubmitError(decision.refusal)
    return decision


def is_runtime_env_failure(info) -> bool:
    """Ray's job info says the job died setting up its runtime env (pip, working_dir, ...), before
    its entrypoint ran."""
    kind = getattr(info, "error_type", None)
    return str(getattr(kind, "value", kind) or "") == "RUNTIME_ENV_SETUP_FAILURE"


@dataclass
class Submission:
    name: str
    args: list[str]
    runtime_env: dict
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_memory: int | None = None
    entrypoint_resources: dict | None = None
    submission_id: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def entrypoint(self) -> str:
        return entrypoint(self.name, self.args)


def new_submission_id(name: str) -> str:
    return f"shardsmith-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def submit(client, sub: Submission) -> str:
    """Hand the job to Ray's job server; returns its submission id."""
    try:
        return client.submit_job(
            entrypoint=sub.entrypoint,
            submission_id=sub.submission_id or new_submission_id(sub.name),
            runtime_env=sub.runtime_env,
            metadata={"shardsmith_job": sub.name, **sub.metadata},
            entrypoint_num_cpus=sub.entrypoint_num_cpus,
            entrypoint_num_gpus=sub.entrypoint_num_gpus,
            entrypoint_memory=sub.entrypoint_memory,
            entrypoint_resources=sub.entrypoint_resources,
        )
    except Exception as e:
        hint = f"\n  {AUTH_HINT}" if is_auth_error(e) else ""
        raise SubmitError(f"the job server refused the job: {type(e).__name__}: {str(e)[:1000]}{hint}") from e


async def _stream_logs(client, job_id: str, out: IO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def follow(client, job_id: str, out: IO = sys.stdout, timeout: float | None = None, poll: float = 1.0) -> str:
    """Stream the job's logs until it ends; returns its final status.

    Raises TimeoutError when ``timeout`` seconds pass first (the job keeps running). The log stream
    ends when the job does; if the stream breaks earlier, the status is polled instead."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        asyncio.run(asyncio.wait_for(_stream_logs(client, job_id, out), timeout))
    except asyncio.TimeoutError:
        raise TimeoutError(f"job {job_id} still running after {timeout:g} s") from None
    except Exception as e:  # the websocket broke: fall back to polling the status
        out.write(f"\n[shardsmith] log stream interrupted ({type(e).__name__}); waiting for the job's status\n")
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still running after {timeout:g} s")
        time.sleep(poll)


def exit_code(info) -> int:
    """The job's status as an exit code: 0 succeeded; a failed job exits with its entrypoint's own
    code (curate's 2 for a configuration error) when Ray recorded it, else 1; 3 stopped."""
    status = str(info.status.value)
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return EXIT_STOPPED
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else EXIT_FAILED


def job_table(jobs) -> str:
    """``shardsmith jobs list``: newest first, one line each."""
    rows = [("SUBMISSION ID", "STATUS", "STARTED", "ENTRYPOINT")]
    for j in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        if not j.submission_id:
            continue  # drivers started with ray.init, not through the job API
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        rows.append((j.submission_id, str(j.status.value), started, j.entrypoint[:80]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)


def job_summary(info) -> str:
    """``shardsmith jobs status``: the job's details as JSON, without its runtime env (which can be
    large; ``ray job status`` shows it)."""
    keys = ("submission_id", "status", "message", "error_type", "entrypoint", "start_time", "end_time",
            "driver_exit_code", "driver_node_id", "metadata")
    data = {k: getattr(info, k, None) for k in keys}
    data["status"] = str(info.status.value)
    kind = data["error_type"]
    data["error_type"] = str(getattr(kind, "value", kind)) if kind else None
    return json.dumps(data, indent=1, default=str)
