"""Job configs: dataclasses filled from a YAML file and from CLI flags, validated before any work.

Every job's config is a dataclass (``config/curate.py``, ``config/generate.py``). ``from_dict``
fills one from a mapping (a YAML file read with ``yaml.safe_load``): unknown keys and values of
the wrong type are refused, naming the key; the job's own ``validate()`` then checks ranges and
combinations. Flags given on the command line override the file's keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import yaml

from shardsmith.errors import ConfigError
from shardsmith.pipelines.core import fs as fsutil


def check_type(key: str, value, hint) -> object:
    """``value`` checked against the type ``hint`` (ints are accepted where floats are; a nested
    dataclass is filled from a mapping); returns the value to store."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return check_type(key, value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        inner = args[:1] * len(value) if args and args[-1] is Ellipsis else args
        return tuple(check_type(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, inner)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        if not args:
            return dict(value)
        return {check_type(f"{key} key", k, args[0]): check_type(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source=key)
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {'an integer' if hint is int else 'a number'}, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data, base=None, source: str = "config"):
    """A ``cls`` config: ``base`` (or the defaults) with the keys of ``data`` set, type-checked."""
    cfg = dataclasses.replace(base) if base is not None else cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(names))}")
        try:
            values[key] = check_type(key, value, hints[key])
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e
    return dataclasses.replace(cfg, **values) if values else cfg


def to_dict(cfg) -> dict:
    """The config as plain data (what ``config show`` prints and the manifest records)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def load_config_file(url: str) -> dict:
    try:
        text = fsutil.read_text(url)
    except FileNotFoundError as e:
        raise ConfigError(f"--config {url}: file not found") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {url}: not valid YAML: {e}") from e
    return data or {}


def with_key(cfg, key: str, value):
    """A copy of ``cfg`` with ``key`` set (``"a.b"``: field b of the nested dataclass a, which may
    be frozen), type-checked as a config file's value would be."""
    head, _, rest = key.partition(".")
    if rest:
        value = with_key(getattr(cfg, head), rest, value)
    else:
        value = check_type(key, value, typing.get_type_hints(type(cfg))[head])
    return dataclasses.replace(cfg, **{head: value})


def config_from_args(cls, args, flags: dict, base=None):
    """The ``cls`` config of parsed CLI ``args``: ``base`` (or the defaults), then the keys of the
    ``--config`` file (``args.config``), then every flag given -- a flag whose value is ``None``
    (argparse's default) was not given, so the file's value or the default stays. ``flags`` maps a
    flag's dest to its key (``"defaults.seed"`` for a nested one), or to ``(key, fn)`` for a flag
    whose value is transformed (``"quiet": ("progress", lambda v: not v)``)."""
    cfg = dataclasses.replace(base) if base is not None else cls()
    path = getattr(args, "config", None)
    if path:
        cfg = from_dict(cls, load_config_file(path), base=cfg, source=f"--config {path}")
    for dest, target in flags.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        key, fn = target if isinstance(target, tuple) else (target, None)
        cfg = with_key(cfg, key, fn(value) if fn else value)
    return cfg
