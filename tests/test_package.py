"""The installed package claims one name, and its imports flow down the layers with no cycle."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {"shardsmith": "shardsmith", "jobs": "shardsmith.jobs", "pipelines": "shardsmith.pipelines",
           "filters": "shardsmith.filters", "cluster": "shardsmith.cluster"}

# Who may import whom: a module of the key's layer may import modules of the listed layers only
# (its own included). The floors, top down: jobs -> flows -> sinks -> stages -> formats -> core
# -> filters; the report beside the flows (core, formats and filters only); cluster loads no models.
ALLOWED = {
    "shardsmith.jobs": None,  # the top: anything
    "shardsmith.pipelines.flows": {"flows", "sinks", "stages", "formats", "core", "config", "report", "filters", "root"},
    "shardsmith.pipelines.report": {"report", "formats", "core", "filters", "root"},
    "shardsmith.pipelines.sinks": {"sinks", "stages", "formats", "core", "filters", "root"},
    "shardsmith.pipelines.stages": {"stages", "formats", "core", "config", "filters", "root"},
    "shardsmith.pipelines.config": {"config", "formats", "core", "filters", "root"},
    "shardsmith.pipelines.formats": {"formats", "core", "filters", "root"},
    "shardsmith.pipelines.core": {"core", "root"},
    "shardsmith.filters": {"filters", "root"},
    "shardsmith.cluster": {"cluster", "root"},
}


def modules() -> dict[str, str]:
    out = {}
    for folder, package in FOLDERS.items():
        for d, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), os.path.join(ROOT, folder))[:-3].replace(os.sep, ".")
                    name = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                    out[name] = os.path.join(d, f)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name or None

    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(open(path).read())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                target = resolve(n) if n.startswith("shardsmith") else None
                if target and target != m:
                    graph[m].add(target)
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "shardsmith" or (len(parts) == 2 and parts[1] == "errors"):
        return "root"
    return parts[2] if parts[1] == "pipelines" and len(parts) > 2 else parts[1]


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state and m != "shardsmith":  # the root package re-exports the API lazily, on demand
            visit(m)


def test_imports_flow_down_the_layers():
    wrong = []
    for m, targets in import_graph().items():
        rule = next((v for k, v in ALLOWED.items() if m == k or m.startswith(k + ".")), "skip")
        if rule is None or rule == "skip":
            continue
        for t in targets:
            if layer(t) not in rule:
                wrong.append(f"{m} imports {t}")
    assert not wrong, "\n".join(sorted(wrong))


@pytest.mark.slow
def test_pip_install_adds_one_top_level_name(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "--target", str(target), ROOT],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    names = {n for n in os.listdir(target) if n not in ("bin", "__pycache__")}
    dist = {n for n in names if n.endswith(".dist-info")}
    assert names - dist == {"shardsmith"}, names
    assert {"cluster", "errors.py", "filters", "jobs", "pipelines"} <= set(os.listdir(target / "shardsmith"))
    # that copy works on its own, from another folder: its modules, its entry point
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import shardsmith.pipelines.flows.curate as c, shardsmith.jobs.cli, importlib.util as u; "
            "print(c.__file__); print(u.find_spec('pipelines'), u.find_spec('jobs'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(str(target)) and r.stdout.splitlines()[1] == "None None"
    r = subprocess.run([sys.executable, "-m", "shardsmith", "--help"], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=120)
    assert r.returncode == 0 and "curate" in r.stdout, r.stderr
