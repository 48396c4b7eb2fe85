"""Offline checks of the cluster configs against the schemas their tools use.

- ``ray up`` configs: Ray's own cluster-config schema (``ray/autoscaler/ray-schema.json``), then
  the same defaults-filling and checks ``ray up`` runs before it touches a cloud
  (``prepare_config`` + ``validate_config``).
- KubeRay manifests: the ``openAPIV3Schema`` of the RayCluster / RayJob CRDs. The API server
  (and kubectl's strict field validation) rejects fields a structural schema does not list, so
  objects with listed properties are closed here too: a misspelled key fails instead of being
  silently dropped. CEL rules (``x-kubernetes-validations``) are not evaluated.

    python -m cluster.validate cluster/ray-up/*.yaml cluster/k8s/*.yaml --crds ../shared/kuberay-crds-v1.7.0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from functools import lru_cache

import yaml

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


class ConfigInvalid(ValueError):
    """A config that its tool would refuse; the message names the file and the offending path."""


# libyaml's safe loader when PyYAML has it: the CRDs are megabytes of YAML (9 s in pure Python).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=_SafeLoader) if d is not None]


# ---------------------------------------------------------------------------------------------
# ray up
# ---------------------------------------------------------------------------------------------

def ray_schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def validate_ray_up(config: dict, source: str = "config") -> dict:
    """Raise ConfigInvalid unless ``ray up`` would accept the config; returns it filled out."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        jsonschema.validate(config, ray_schema())
    except jsonschema.ValidationError as e:
        raise ConfigInvalid(f"{source}: {_where(e)}: {e.message}") from e
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except (ValueError, RuntimeError, KeyError, jsonschema.ValidationError) as e:
        raise ConfigInvalid(f"{source}: {e}") from e
    return prepared


# ---------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------

def closed(schema):
    """The schema with every object that lists its properties closed to other keys, as the API
    server's structural-schema pruning plus strict field validation treat it."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def _crd_schema(path: str, version: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    (crd,) = load_yaml(path)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return json.dumps(closed(v["schema"]["openAPIV3Schema"]))
    raise ConfigInvalid(f"{path}: no version {version!r} in the CRD")


def crd_schema(crd_dir: str, kind: str, version: str = "v1") -> dict:
    if kind not in CRD_FILES:
        raise ConfigInvalid(f"kind {kind!r}: expected one of {', '.join(CRD_FILES)}")
    return json.loads(_crd_schema(os.path.join(crd_dir, CRD_FILES[kind]), version))


def validate_kuberay(doc: dict, crd_dir: str, source: str = "manifest") -> None:
    """Raise ConfigInvalid unless the manifest fits its CRD's openAPIV3Schema (ray.io/v1)."""
    import jsonschema

    api, kind = doc.get("apiVersion"), doc.get("kind")
    if api != "ray.io/v1":
        raise ConfigInvalid(f"{source}: apiVersion {api!r}, expected ray.io/v1")
    schema = crd_schema(crd_dir, kind)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{_where(e)}: {e.message}" for e in errors[:10]]
        raise ConfigInvalid(f"{source} ({kind}): " + "; ".join(lines))


def _where(e) -> str:
    return ".".join(str(p) for p in e.absolute_path) or "(top level)"


def validate_file(path: str, crd_dir: str | None = None) -> None:
    for doc in load_yaml(path):
        if "apiVersion" in doc:
            if crd_dir is None:
                raise ConfigInvalid(f"{path}: a Kubernetes manifest; give --crds DIR (the KubeRay CRDs)")
            validate_kuberay(doc, crd_dir, path)
        else:
            validate_ray_up(doc, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.validate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="ray up configs and KubeRay manifests (YAML)")
    p.add_argument("--crds", metavar="DIR", help="folder with the KubeRay CRDs (ray.io_rayclusters.yaml, ...)")
    args = p.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            validate_file(path, args.crds)
            print(f"ok       {path}")
        except (ConfigInvalid, FileNotFoundError, yaml.YAMLError) as e:
            print(f"INVALID  {path}: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
