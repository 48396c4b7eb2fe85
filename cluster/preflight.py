"""What the cluster has, asked before a job is submitted, and the runtime env that follows.

``shardsmith submit`` first runs a tiny preflight job through the same job API (``python -c
PROBE``, no runtime env, so it sees the nodes' own Python): it prints the Python version, whether
that Python is a virtualenv, the marker environment, the CUDA version torch was built for (read
from ``torch/version.py``, torch is not imported) and every installed distribution with its
version and requirements. :func:`decide` compares that with ``requirements.lock``:

- every pinned runtime requirement installed at the lock's version: no ``pip`` in the runtime env
  (a worker image built from ``cluster/Dockerfile``, or nodes started from the project's .venv);
- some missing or at another version: a ``pip`` runtime env with exactly those pins;
- a Python outside pyproject's ``requires-python``, or a torch other than the lock's (another
  version, or built for another CUDA): refused before anything is submitted. A second torch cannot
  be installed beside the cluster's own: its CUDA libraries and every compiled extension built
  against it would disagree.

The pinned runtime requirements are the lock entries that pyproject's ``[project].dependencies``
need, transitively (torch and its CUDA libraries, open_clip, diffusers, s3fs, ...), Ray excepted:
the cluster's Ray is the one that runs the job, and a pip-installed Ray would shadow it. The test
tools of the lock (pytest, moto) are not among them, nor Ray's own dependencies unless the project
needs them too. A package's requirements are read from its metadata at the lock's version, on the
cluster (sent by the probe) or on this machine, whichever has that version.

Plain Python and ``packaging`` (a dependency of Ray's own SDK): no torch, no Ray import here.
"""

from __future__ import annotations

import base64
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import InvalidMarker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from shardsmith.errors import ShardsmithError

MARK = "SHARDSMITH-PREFLIGHT "

# Run on the cluster with the nodes' ``python``: standard library only (the cluster may have none
# of the project's packages). The first distribution of a name on sys.path wins, as for imports.
PROBE = r'''
import base64, importlib.metadata as md, json, os, platform, re, sys, zlib
def ver(i):
    v = "%d.%d.%d" % (i.major, i.minor, i.micro)
    return v if i.releaselevel == "final" else v + i.releaselevel[0] + str(i.serial)
dists = {}
for d in md.distributions():
    name = (d.metadata["Name"] or "").strip()
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key and key not in dists:
        dists[key] = [d.version, list(d.requires or [])]
cuda = None
if "torch" in dists:
    try:
        text = md.distribution("torch").locate_file("torch/version.py").read_text()
        m = re.search(r"^cuda\b[^=]*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        cuda = m.group(1) if m else None
    except Exception:
        cuda = None
env = {"implementation_name": sys.implementation.name, "implementation_version": ver(sys.implementation.version),
       "os_name": os.name, "platform_machine": platform.machine(), "platform_release": platform.release(),
       "platform_system": platform.system(), "platform_version": platform.version(),
       "python_full_version": platform.python_version(),
       "platform_python_implementation": platform.python_implementation(),
       "python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform}
out = {"python": platform.python_version(), "executable": sys.executable,
       "virtualenv": sys.prefix != getattr(sys, "base_prefix", sys.prefix), "markers": env,
       "torch_cuda": cuda, "dists": dists}
print("SHARDSMITH-PREFLIGHT " + base64.b64encode(zlib.compress(json.dumps(out).encode(), 9)).decode(), flush=True)
'''


class PreflightError(ShardsmithError, RuntimeError):
    """The cluster's environment cannot run the project, or could not be asked."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def probe_command() -> list[str]:
    return ["python", "-c", PROBE]


@dataclass
class ClusterEnv:
    """What the probe saw on the node that ran it."""

    python: str
    executable: str
    virtualenv: bool
    markers: dict
    torch_cuda: str | None
    dists: dict[str, tuple[str, list[str]]]  # canonical name -> (version, requirement strings)

    def version(self, name: str) -> str | None:
        d = self.dists.get(canonical(name))
        return d[0] if d else None


def parse_probe_output(text: str) -> ClusterEnv:
    lines = [ln for ln in text.splitlines() if ln.startswith(MARK)]
    if not lines:
        tail = " | ".join(ln.strip() for ln in text.strip().splitlines()[-3:])[:300]
        raise PreflightError(f"the preflight job printed no report (its output ends: {tail or 'nothing'})")
    data = json.loads(zlib.decompress(base64.b64decode(lines[-1][len(MARK):])))
    return ClusterEnv(python=data["python"], executable=data["executable"], virtualenv=bool(data["virtualenv"]),
                      markers=data["markers"], torch_cuda=data.get("torch_cuda"),
                      dists={k: (v[0], list(v[1])) for k, v in data["dists"].items()})


def local_env() -> ClusterEnv:
    """This machine's environment, read the way the probe reads the cluster's (the probe's own
    code, run here): what ``--pip`` pins come from, and how tests read a real environment."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(PROBE, "<preflight probe>", "exec"), {"__name__": "__probe__"})
    return parse_probe_output(buf.getvalue())


# ---------------------------------------------------------------------------------------------
# The lock and the project's runtime requirements
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pin:
    name: str  # as the lock spells it
    version: str

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


def read_lock(path: str | Path) -> dict[str, Pin]:
    """``NAME==VERSION`` lines (comments and blank lines skipped), keyed by canonical name."""
    pins: dict[str, Pin] = {}
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PreflightError(f"{path}: cannot read the lock file: {e.strerror or e}") from e
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)\s*(;.*)?$", line)
        if not m:
            raise PreflightError(f"{path}:{n}: expected NAME==VERSION, got {raw.strip()!r}")
        pins[canonical(m.group(1))] = Pin(m.group(1), m.group(3))
    return pins


def same_version(a: str, b: str) -> bool:
    """Equal public versions (``2.14.1+cu130`` is torch 2.14.1; its CUDA is compared apart)."""
    try:
        return Version(a).public == Version(b).public
    except InvalidVersion:
        return a == b


def lock_cuda(lock: dict[str, Pin]) -> str | None:
    """The CUDA the lock's torch is built for, from its CUDA runtime pin (``nvidia-cuda-runtime==13.0.96``
    -> 13.0, ``nvidia-cuda-runtime-cu12==12.8.90`` -> 12.8); None for a CPU-only lock."""
    for key in sorted(lock):
        if re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", key):
            parts = lock[key].version.split(".")
            return ".".join(parts[:2])
    return None


def _marker_ok(req: Requirement, markers: dict, extras: frozenset) -> bool:
    if req.marker is None:
        return True
    try:
        return any(req.marker.evaluate({**markers, "extra": e}) for e in (extras or {""}))
    except (InvalidMarker, KeyError, ValueError, TypeError):
        return True  # a marker this packaging cannot evaluate: keep the requirement (pinning it is safe)


def runtime_closure(roots: list[str], lock: dict[str, Pin], sources: list[ClusterEnv], markers: dict) -> list[str]:
    """Canonical names of the lock entries that ``roots`` need, transitively, under ``markers``.

    A package's requirements come from the first source holding it at the lock's version, else
    from the first holding it at all; a package no source holds is pinned without its own
    requirements (pip resolves those)."""
    def requires(key: str) -> list[str]:
        pin = lock.get(key)
        held = [s.dists[key] for s in sources if key in s.dists]
        exact = [d for d in held if pin and same_version(d[0], pin.version)]
        return (exact or held or [("", [])])[0][1]

    seen: set[tuple[str, frozenset]] = set()
    names: set[str] = set()
    todo: list[tuple[str, frozenset]] = []
    for text in roots:
        r = Requirement(text)
        if _marker_ok(r, markers, frozenset()):
            todo.append((canonical(r.name), frozenset(r.extras)))
    while todo:
        key, extras = todo.pop()
        if (key, extras) in seen or key == "ray":
            continue
        seen.add((key, extras))
        if key not in lock:
            continue  # not pinned: nothing to compare (pip's resolver handles it, if ever needed)
        names.add(key)
        for text in requires(key):
            try:
                r = Requirement(text)
            except InvalidRequirement:
                continue
            if _marker_ok(r, markers, extras):
                todo.append((canonical(r.name), frozenset(r.extras)))
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------------------------

@dataclass
class Decision:
    """What goes into the runtime env's ``pip``, why, and what was seen."""

    mode: str  # "none", "pip" (decided), "forced-none" (--no-pip), "forced-pip" (--pip), "runtime-env" (the user's file)
    pins: list[str] = field(default_factory=list)  # exactly what pip installs
    checked: int = 0
    missing: list[str] = field(default_factory=list)  # lock spellings
    different: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (cluster, lock)
    cluster: ClusterEnv | None = None
    refusal: str | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The one line ``submit`` prints about the decision."""
        if self.mode == "forced-none":
            return "--no-pip: no pip in the runtime env (the cluster was not asked what it has)"
        if self.mode == "forced-pip":
            return f"--pip: pip will install the {len(self.pins)} pinned runtime requirements of the lock"
        if self.mode == "runtime-env":
            return "packages as the --runtime-env file says (pip/uv/conda there): the cluster was not asked"
        seen = self.seen()
        if self.mode == "none":
            return f"{seen}; all {self.checked} pinned runtime requirements installed at the lock's versions -> no pip"
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({', '.join(self.missing)})")
        if self.different:
            parts.append(f"{len(self.different)} at other versions ("
                         + ", ".join(f"{n} {c} on the cluster, {v} pinned" for n, (c, v) in self.different.items()) + ")")
        return f"{seen}; of {self.checked} pinned runtime requirements {' and '.join(parts)} -> pip will install: " \
               + " ".join(self.pins)

    def seen(self) -> str:
        c = self.cluster
        if c is None:
            return "cluster not asked"
        torch = c.version("torch")
        torch_text = f"torch {torch}" + (f" (CUDA {c.torch_cuda})" if c.torch_cuda else " (no CUDA)") if torch \
            else "no torch"
        venv = f" (a virtualenv: {c.executable})" if c.virtualenv else ""
        return f"cluster: Python {c.python}{venv}, Ray {c.version('ray') or '?'}, {torch_text}"

    def record(self) -> dict[str, str]:
        """For the job's metadata in Ray's job table (string values), shown by ``shardsmith jobs status``."""
        out = {"shardsmith_runtime_env": self.mode, "shardsmith_pip": " ".join(self.pins)}
        if self.cluster is not None:
            c = self.cluster
            out["shardsmith_cluster"] = json.dumps(
                {"python": c.python, "virtualenv": c.virtualenv, "ray": c.version("ray"), "torch": c.version("torch"),
                 "torch_cuda": c.torch_cuda, "checked": self.checked, "missing": self.missing,
                 "different": {n: {"cluster": a, "lock": b} for n, (a, b) in self.different.items()}},
                separators=(",", ":"))
        return out


def check_python(python: str, requires_python: str | None) -> str | None:
    if not requires_python:
        return None
    try:
        ok = SpecifierSet(requires_python).contains(Version(python), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return None
    if ok:
        return None
    return (f"python: the cluster runs Python {python}, shardsmith needs Python {requires_python} "
            "(pyproject.toml requires-python)")


def check_torch(cluster: ClusterEnv, lock: dict[str, Pin], lock_name: str = "requirements.lock") -> str | None:
    """A torch other than the lock's on the cluster (version, or CUDA build): a refusal line."""
    have, pin = cluster.version("torch"), lock.get("torch")
    if not have or not pin:
        return None  # missing torch is installed like any missing pin; an unpinned one is not ours to judge
    hint = ("a second torch cannot be installed beside the cluster's; run the worker image from cluster/Dockerfile "
            "(or force: --pip installs the lock's anyway, --no-pip runs with the cluster's)")
    if not same_version(have, pin.version):
        return f"torch: the cluster has {have}, {lock_name} pins {pin.version}; {hint}"
    want = lock_cuda(lock)
    if want and (cluster.torch_cuda or "").split(".")[:2] != want.split(".")[:2]:
        built = f"built for CUDA {cluster.torch_cuda}" if cluster.torch_cuda else "a build without CUDA"
        return f"torch: the cluster's torch {have} is {built}, {lock_name}'s torch {pin.version} is built " \
               f"for CUDA {want}; {hint}"
    return None


def decide(cluster: ClusterEnv, lock: dict[str, Pin], roots: list[str], requires_python: str | None = None,
           local: ClusterEnv | None = None, lock_name: str = "requirements.lock") -> Decision:
    """Compare the cluster with the lock: no pip, pip with exactly the missing/different pins, or a refusal."""
    names = runtime_closure(roots, lock, [cluster] + ([local] if local else []), cluster.markers)
    d = Decision(mode="none", checked=len(names), cluster=cluster)
    d.refusal = check_python(cluster.python, requires_python) or check_torch(cluster, lock, lock_name)
    for key in names:
        pin = lock[key]
        have = cluster.version(key)
        if have is None:
            d.missing.append(pin.name)
        elif not same_version(have, pin.version):
            d.different[pin.name] = (have, pin.version)
        else:
            continue
        d.pins.append(str(pin))
    if d.pins:
        d.mode = "pip"
        if "torch" in (canonical(p.split("==")[0]) for p in d.pins):
            d.notes.append("torch is missing on the cluster: pip installs it with its CUDA libraries (several GB, "
                           "once per node)")
        if cluster.virtualenv:
            d.notes.append(f"the cluster's Python is a virtualenv ({cluster.executable}): Ray copies that whole "
                           "virtualenv on every node to build a pip env; a worker image from cluster/Dockerfile "
                           "needs none")
    return d


def forced_pins(lock: dict[str, Pin], roots: list[str], local: ClusterEnv | None) -> list[str]:
    """``--pip``: every pinned runtime requirement, the closure read from this machine's packages."""
    markers = local.markers if local else {}
    return [str(lock[k]) for k in runtime_closure(roots, lock, [local] if local else [], markers)]


# ---------------------------------------------------------------------------------------------
# A job that failed in its runtime env
# ---------------------------------------------------------------------------------------------

def runtime_env_error_line(message: str) -> str:
    """One line out of Ray's runtime-env setup error (a traceback, often with pip's whole output):
    pip's own ``ERROR:`` line when there is one, else the last ``...Error: ...`` line, else the first."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    if not lines:
        return "runtime env setup failed (Ray gave no message)"
    pip_errors = [ln for ln in lines if ln.startswith("ERROR:")]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln)]
    line = (pip_errors or errors[-1:] or lines[:1])[0]
    return line[:400]
