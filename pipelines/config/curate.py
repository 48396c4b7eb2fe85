"""Run configuration: one dataclass per job, filled from a YAML file and from CLI flags.

Validation happens here, before any work is scheduled: unknown keys, wrong types and thresholds
out of range are rejected with the key's name. The YAML is read with ``yaml.safe_load``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import yaml

from shardsmith.filters.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED
from shardsmith.filters.presets import preset_rules
from shardsmith.filters.rules import RuleError, RuleSet
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.formats.fetch import OPT_OUT_DIRECTIVES, RETRYABLE_KINDS


class ConfigError(ValueError):
    """A configuration problem, found before any work starts; the message names the key."""


@dataclass
class CurateConfig:
    input: str = ""
    output: str = ""
    mode: str = "auto"  # auto | images | metadata | urls
    clip_model: str = DEFAULT_MODEL
    clip_pretrained: str | None = DEFAULT_PRETRAINED
    aesthetic_head: str | None = None
    watermark_head: str | None = None
    nsfw_head: str | None = None
    similarity: bool = True
    preset: str | None = "laion-aesthetics-5plus"
    rules: list[str] = field(default_factory=list)  # added after the preset's rules
    embeddings: bool = False  # write clip-retrieval style img_emb/ + metadata/
    batch_size: int = 64  # images per model forward
    decode_batch_size: int = 32  # images per decode task batch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_actors: int = 0  # 0 = one per GPU, or sized from the CPUs
    actor_cpus: float = 0.0  # 0 = auto
    max_image_pixels: int = 178_956_970
    exif_transpose: bool = False
    detect_generated: bool = False  # look for shardsmith's invisible watermark: `generated` column
    fast_decode: bool = False  # reduced-size JPEG decoding (PIL draft): faster, pixels not exactly preprocess's
    address: str | None = None  # Ray address; None = a local Ray
    overwrite: bool = False
    progress: bool = True
    report: bool = True  # write OUTPUT/report.html at the end; does not change the data outputs
    # mode urls: fetch the URLs of LAION metadata (pipelines/download.py, pipelines/fetch.py)
    urls_per_shard: int = 10_000  # metadata rows per download shard: the unit of fetch, commit and retry
    fetch_threads: int = 16  # concurrent fetches per download task
    fetch_timeout: float = 10.0  # seconds, for the connection and for each read
    fetch_deadline: float = 60.0  # seconds for a whole request, body included (per attempt)
    fetch_retries: int = 2  # extra attempts after a connection error, 5xx or 429 (backoff, Retry-After)
    fetch_max_bytes: int = 33_554_432  # a larger body is cut: too_large
    fetch_max_redirects: int = 5
    user_agent: str = ""  # "" = shardsmith/VERSION (+project URL); name your project and a contact
    opt_out_directives: list[str] = field(default_factory=lambda: list(OPT_OUT_DIRECTIVES))  # X-Robots-Tag
    resize_max_side: int = 0  # downscale larger images at download time (0 = store as downloaded)
    retry_failed: bool = False  # re-fetch the earlier failures of retry_kinds, keep everything else
    retry_kinds: list[str] = field(default_factory=lambda: list(RETRYABLE_KINDS))

    def all_rules(self) -> list[str]:
        return (preset_rules(self.preset) if self.preset else []) + list(self.rules)

    def ruleset(self) -> RuleSet:
        try:
            return RuleSet.parse(self.all_rules())
        except RuleError as e:
            raise ConfigError(f"rules: {e}") from e

    def heads(self) -> dict[str, str]:
        return {k: v for k, v in (("aesthetic", self.aesthetic_head), ("pwatermark", self.watermark_head),
                                  ("punsafe", self.nsfw_head)) if v}

    def fingerprint(self) -> dict:
        """What decides the outputs: a rerun into the same OUTPUT must match it to resume."""
        keys = ("mode", "clip_model", "clip_pretrained", "aesthetic_head", "watermark_head", "nsfw_head",
                "similarity", "embeddings", "max_image_pixels", "exif_transpose", "detect_generated")
        if self.fast_decode:  # only when on: runs without it keep their fingerprint
            keys += ("fast_decode",)
        if self.mode == "urls":  # the fetch settings that change what is stored (timeouts do not)
            keys += ("urls_per_shard", "resize_max_side", "opt_out_directives")
        return {"rules": self.all_rules(), **{k: getattr(self, k) for k in keys}}

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input: an input path or URL is required")
        if not self.output:
            raise ConfigError("output: an output path or URL is required")
        if self.mode not in ("auto", "images", "metadata", "urls"):
            raise ConfigError(f"mode: {self.mode!r} is not one of auto, images, metadata, urls")
        self.validate_fetch()
        for key in ("batch_size", "decode_batch_size", "max_image_pixels"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.num_actors < 0 or self.actor_cpus < 0:
            raise ConfigError("num_actors / actor_cpus: must be >= 0 (0 = automatic)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        self.ruleset()


    def validate_fetch(self) -> None:
        """The ``mode: urls`` keys (also checked in other modes, where the ones that would be
        silently ignored are refused)."""
        from shardsmith.pipelines.formats.fetch import is_fetch_error_kind

        if self.mode != "urls":
            for key, default in (("retry_failed", False), ("resize_max_side", 0)):
                if getattr(self, key) != default:
                    raise ConfigError(f"{key}: only applies to mode urls (--mode urls: fetch the URLs of "
                                      "LAION metadata parquet)")
        for key, lo, hi in (("urls_per_shard", 1, 10_000_000), ("fetch_threads", 1, 256), ("fetch_retries", 0, 10),
                            ("fetch_max_bytes", 1, 2 ** 40), ("fetch_max_redirects", 0, 50),
                            ("resize_max_side", 0, 65_535)):
            if not lo <= getattr(self, key) <= hi:
                raise ConfigError(f"{key}: must be in [{lo}, {hi}], got {getattr(self, key)}")
        for key in ("fetch_timeout", "fetch_deadline"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0 seconds, got {getattr(self, key)}")
        bad = [k for k in self.retry_kinds if not is_fetch_error_kind(k)]
        if bad:
            raise ConfigError(f"retry_kinds: {bad[0]!r} is not a fetch error kind (e.g. timeout, connection_error, "
                              "http_5xx, http_429, http_404, too_large, not_an_image)")
        if "opted_out" in self.retry_kinds:
            raise ConfigError("retry_kinds: opted_out is never retried (the site asked not to be used)")


def _check_type(key: str, value, annotation) -> object:
    """Check ``value`` against the dataclass annotation; ints are accepted where floats are."""
    hint = typing.get_type_hints(CurateConfig)[key] if isinstance(annotation, str) else annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def config_from_dict(data: dict, base: CurateConfig | None = None, source: str = "config") -> CurateConfig:
    cfg = dataclasses.replace(base) if base else CurateConfig()
    names = {f.name: f for f in dataclasses.fields(CurateConfig)}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(names))}")
        setattr(cfg, key, _check_type(key, value, names[key].type))
    return cfg


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
