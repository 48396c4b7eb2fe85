"""Every config in cluster/ passes the schema of the tool that reads it, and says what we promise:
a CPU head that schedules no work, GPU workers from zero, token auth on, the job API never
exposed, the image pinned to the tested versions, entrypoints that the jobs' own parsers accept.

- ``ray up`` configs: Ray's cluster-config schema plus the checks ``ray up`` runs before it calls
  a cloud (``cluster.validate.validate_ray_up``).
- KubeRay manifests: the KubeRay v1.7.0 CRDs' ``openAPIV3Schema``, from ``../shared`` beside the
  repository; a missing folder is a failure, not a skip.
"""

from __future__ import annotations

import copy
import glob
import importlib
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml

from shardsmith.cluster import validate as cv
from shardsmith.cluster.submit import is_secret_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRD_DIR = os.path.join(ROOT, "..", "shared", "kuberay-crds-v1.7.0")
RAY_UP = sorted(glob.glob(os.path.join(ROOT, "cluster", "ray-up", "*.yaml")))
K8S = sorted(glob.glob(os.path.join(ROOT, "cluster", "k8s", "*.yaml")))
DOCKERFILE = os.path.join(ROOT, "cluster", "Dockerfile")


def project_version() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["version"]


IMAGE = re.compile(r"^[a-z0-9.\-/]+/shardsmith-worker:" + re.escape(project_version()) + "$")


def ray_version() -> str:
    import ray

    return ray.__version__


def load(path: str) -> dict:
    (doc,) = cv.load_yaml(path)
    return doc


@pytest.fixture(scope="module")
def crd_dir() -> str:
    missing = [f for f in cv.CRD_FILES.values() if not os.path.isfile(os.path.join(CRD_DIR, f))]
    if missing:
        pytest.fail(f"KubeRay v1.7.0 CRDs not found: {', '.join(missing)} missing in {os.path.normpath(CRD_DIR)} "
                    "(the shared folder beside the repository); the KubeRay manifests cannot be validated")
    return CRD_DIR


def test_the_configs_the_docs_name_are_all_there():
    assert [os.path.basename(p) for p in RAY_UP] == ["aws.yaml", "gcp.yaml"]
    assert [os.path.basename(p) for p in K8S] == ["raycluster.yaml", "rayjob-curate.yaml", "rayjob-generate.yaml"]
    assert os.path.isfile(DOCKERFILE)


# ---------------------------------------------------------------------------------------------
# ray up
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", RAY_UP, ids=os.path.basename)
def test_ray_up_config_passes_rays_own_validation(path):
    cfg = load(path)
    prepared = cv.validate_ray_up(cfg, path)

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must schedule no work"
    assert prepared["available_node_types"][cfg["head_node_type"]]["max_workers"] == 0
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t.get("min_workers", 0) == 0 for t in gpu), "an autoscaling GPU group from zero"
    assert IMAGE.match(cfg["docker"]["image"]), cfg["docker"]["image"]

    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the job API binds to the head's loopback"
    assert "--num-cpus=0" in head_start
    for cmd in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in cmd and "RAY_AUTH_TOKEN_PATH=" in cmd, "token auth on every node"
    assert "~/.ray/auth_token" in cfg["file_mounts"], "the token reaches the nodes as a file, not in the config"


def test_aws_security_group_opens_ssh_only_and_never_to_the_world():
    cfg = load(os.path.join(ROOT, "cluster", "ray-up", "aws.yaml"))
    rules = cfg["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    assert all(ip["CidrIp"] != "0.0.0.0/0" for r in rules for ip in r["IpRanges"])


def test_rays_schema_catches_mistakes():
    """The validation is not vacuous: a misspelled key and a wrong type are refused."""
    cfg = load(RAY_UP[0])
    typo = copy.deepcopy(cfg)
    typo["max_worker"] = 3
    with pytest.raises(cv.ConfigInvalid, match="max_worker"):
        cv.validate_ray_up(typo)
    wrong = copy.deepcopy(cfg)
    wrong["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(cv.ConfigInvalid, match="available_node_types"):
        cv.validate_ray_up(wrong)
    missing_head = copy.deepcopy(cfg)
    missing_head["head_node_type"] = "nope"
    with pytest.raises(cv.ConfigInvalid, match="head_node_type"):
        cv.validate_ray_up(missing_head)


# ---------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------

def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def containers(spec: dict):
    yield spec["headGroupSpec"]["template"]["spec"]["containers"]
    for g in spec["workerGroupSpecs"]:
        yield g["template"]["spec"]["containers"]


@pytest.mark.parametrize("path", K8S, ids=os.path.basename)
def test_kuberay_manifest_passes_the_v1_7_crd_schema(path, crd_dir):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    cv.validate_kuberay(doc, crd_dir, path)

    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray_version()
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    assert head["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups and all(g["minReplicas"] == 0 for g in gpu_groups), "a GPU group that scales from zero"
    for cs in containers(spec):
        assert IMAGE.match(cs[0]["image"]), cs[0]["image"]
    if doc["kind"] == "RayJob":
        assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_crd_schema_catches_mistakes(crd_dir):
    doc = load(os.path.join(ROOT, "cluster", "k8s", "rayjob-curate.yaml"))
    typo = copy.deepcopy(doc)
    typo["spec"]["shutdownAfterJobFinished"] = True
    with pytest.raises(cv.ConfigInvalid, match="shutdownAfterJobFinished"):
        cv.validate_kuberay(typo, crd_dir)
    wrong = copy.deepcopy(doc)
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = "zero"
    with pytest.raises(cv.ConfigInvalid, match="minReplicas"):
        cv.validate_kuberay(wrong, crd_dir)
    deep = copy.deepcopy(doc)
    deep["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resourcs"] = {}
    with pytest.raises(cv.ConfigInvalid, match="resourcs"):
        cv.validate_kuberay(deep, crd_dir)


@pytest.mark.parametrize("path", [p for p in K8S if "rayjob" in p], ids=os.path.basename)
def test_rayjob_entrypoint_is_a_plain_job_module_its_parser_accepts(path):
    entry = shlex.split(load(path)["spec"]["entrypoint"])
    assert entry[:2] == ["python", "-m"] and entry[2].startswith("shardsmith.jobs.")
    module = entry[2]
    path_in_tree = os.path.join(ROOT, "jobs", module.split(".")[-1] + ".py")
    assert os.path.isfile(path_in_tree), f"{path}: the entrypoint's job module {module} is not in this tree"
    import argparse

    parser = argparse.ArgumentParser(prog=module, exit_on_error=False)
    importlib.import_module(module).add_arguments(parser)
    args = parser.parse_args(entry[3:])
    assert args.output.startswith("s3://")


def test_no_config_writes_a_credential():
    """Env entries with secret-looking names may only come from a Secret, never a literal value."""
    def walk(node):
        if isinstance(node, dict):
            if "name" in node and "value" in node and isinstance(node["name"], str):
                yield node["name"]
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    for path in RAY_UP + K8S:
        doc = load(path)
        literal = [n for n in walk(doc) if is_secret_name(n)]
        assert not literal, f"{path}: credentials written as values: {literal}"
        if doc.get("kind") == "RayJob":
            env_vars = (yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})
            assert not [k for k in env_vars if is_secret_name(k)]


# ---------------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------------

def test_dockerfile_builds_on_the_official_ray_gpu_image_at_the_tested_versions():
    text = open(DOCKERFILE).read()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    (base,) = re.findall(r"^FROM (\S+)", text, flags=re.M)
    base = base.replace("${RAY_VERSION}", args["RAY_VERSION"]).replace("${PYTHON_TAG}", args["PYTHON_TAG"])
    assert base.startswith("rayproject/ray:") and "ray-ml" not in base
    assert base == f"rayproject/ray:{ray_version()}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
    lock = open(os.path.join(ROOT, "requirements.lock")).read()
    assert f"\nray=={args['RAY_VERSION']}\n" in lock
    assert re.search(r"pip install .*-r requirements\.lock", text)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        folders = set(tomllib.load(f)["tool"]["setuptools"]["package-dir"].values())
    for folder in folders:
        assert re.search(rf"^COPY .*\b{folder} \./{folder}$", text, flags=re.M), f"the image lacks the {folder} folder"


def test_cluster_package_loads_no_model_stack():
    """Submitting from a laptop needs Ray's SDK only: cluster/ imports neither torch nor a model."""
    code = ("import sys, shardsmith.cluster.submit, shardsmith.cluster.validate, shardsmith.jobs.submit\n"
            "heavy = sorted(m for m in ('torch', 'open_clip', 'diffusers', 'transformers') if m in sys.modules)\n"
            "sys.exit(f'imported {heavy}' if heavy else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr or r.stdout


def test_validate_command_reports_every_config(crd_dir):
    r = subprocess.run([sys.executable, "-m", "shardsmith.cluster.validate", *RAY_UP, *K8S, "--crds", crd_dir],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok ") == len(RAY_UP) + len(K8S)
