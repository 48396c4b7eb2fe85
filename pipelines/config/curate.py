"""``curate`` (and ``download``): what a run is asked to do, validated before any work.

The heads: the built-in scores take their weights from ``aesthetic_head``, ``watermark_head`` and
``nsfw_head`` (``--aesthetic-head`` ...); any number of others are declared under ``heads``
(``--head NAME=ARCH:PATH``), each becoming a score column rules can use (``filters/scores.py``).
Any of them may name a predictor instead of a file (``--aesthetic-head laion-aesthetic-v2``,
``heads: {punsafe: {predictor: laion-nsfw-l14}}``): a built-in one or one declared under
``predictors`` (``filters/predictors.py``), fetched once, verified and cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardsmith.errors import ConfigError
from shardsmith.filters.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED
from shardsmith.filters.predictors import Predictor, predictor_table
from shardsmith.filters.presets import preset_rules
from shardsmith.filters.rules import RuleError, RuleSet
from shardsmith.filters.scores import BUILTIN, BUILTIN_HEADS, HeadSpec, ScoreSet, declared_score
from shardsmith.pipelines.formats.fetch import OPT_OUT_DIRECTIVES, RETRYABLE_KINDS

HEAD_KEYS = ("arch", "weights", "predictor", "label")  # of an entry under ``heads``


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
    heads: dict[str, dict] = field(default_factory=dict)  # NAME -> {arch, weights | predictor[, label]}: more columns
    predictors: dict[str, dict] = field(default_factory=dict)  # NAME -> {url, sha256, format[, size, clip]}
    similarity: bool = True
    preset: str | None = "laion-aesthetics-5plus"
    rules: list[str] = field(default_factory=list)  # added after the preset's rules
    embeddings: bool = False  # write clip-retrieval style img_emb/ + metadata/
    batch_size: int = 64  # images per model forward
    precision: str = "auto"  # CLIP towers: auto (fp16 on CUDA, bf16 on CPUs with bf16 units, else fp32) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the image tower (fixed forward size)
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
    # mode urls: fetch the URLs of LAION metadata (stages/download.py, formats/fetch.py)
    urls_per_shard: int = 10_000  # metadata rows per download shard: the unit of fetch, commit and retry
    fetch_threads: int = 16  # concurrent fetches per download task
    fetch_timeout: float = 10.0  # seconds, for the connection and for each read
    fetch_deadline: float = 60.0  # seconds for a whole request, body included (per attempt)
    fetch_retries: int = 2  # extra attempts after a connection error, 5xx or 429 (backoff, Retry-After)
    fetch_max_bytes: int = 33_554_432  # a larger body is cut: too_large
    fetch_max_redirects: int = 5
    user_agent: str = ""  # "" = shardsmith/VERSION (+project URL); name your project and a contact
    opt_out_directives: list[str] = field(default_factory=lambda: list(OPT_OUT_DIRECTIVES))  # X-Robots-Tag
    allow_private_addresses: bool = False  # fetch from loopback/private/link-local addresses (intranet mirrors)
    resize_max_side: int = 0  # downscale larger images at download time (0 = store as downloaded)
    retry_failed: bool = False  # re-fetch the earlier failures of retry_kinds, keep everything else
    retry_kinds: list[str] = field(default_factory=lambda: list(RETRYABLE_KINDS))
    # one run per OUTPUT (core/lock.py) and no silent hang (core/dispatch.py)
    lock_ttl: float = 60.0  # seconds OUTPUT's lease lives without renewal: a killed run's is taken over then
    break_lock: bool = False  # take OUTPUT's lease even if another run still renews it
    stall_timeout: float = 1800.0  # seconds without any progress before the run stops, naming stage and shard

    def all_rules(self) -> list[str]:
        return (preset_rules(self.preset) if self.preset else []) + list(self.rules)

    def ruleset(self) -> RuleSet:
        try:
            return RuleSet.parse(self.all_rules(), ranges=self.score_set().ranges())
        except RuleError as e:
            raise ConfigError(f"rules: {e}") from e

    def predictor_table(self) -> dict[str, Predictor]:
        """The built-in predictors and the config's own (``predictors:``, ``--predictor-sha256``)."""
        return predictor_table(self.predictors)

    def head_specs(self) -> dict[str, HeadSpec]:
        """Every head with weights: the built-ins' (from their own keys), then the declared ones;
        a value naming a predictor becomes that predictor (its architecture from its format)."""
        table = self.predictor_table()
        out = {}
        for s in BUILTIN_HEADS:
            value = getattr(self, s.option)
            if value:
                p = table.get(value)
                out[s.name] = HeadSpec(p.arch, "", p) if p else HeadSpec(s.arch, value)
        for name, h in self.heads.items():
            if h.get("predictor"):
                p = table[h["predictor"]]
                out[name] = HeadSpec(p.arch, "", p)
            else:
                out[name] = HeadSpec(h["arch"], h["weights"])
        return out

    def score_set(self) -> ScoreSet:
        """The run's score columns: the built-ins, then the declared heads (each with the range and
        input of its architecture: a predictor that reads pixels makes a pixel score)."""
        labels = {n: h.get("label") for n, h in self.heads.items()}
        specs = self.head_specs()
        return ScoreSet.for_run([declared_score(n, spec.arch, labels.get(n)) for n, spec in specs.items()])

    def check_heads(self) -> None:
        table = self.predictor_table()
        for s in BUILTIN_HEADS:
            value = getattr(self, s.option)
            if value and value in table:
                declared_score(s.name, table[value].arch)  # the predictor's output must fit the column
        for name, h in self.heads.items():
            if not isinstance(h, dict):
                raise ConfigError(f"heads.{name}: expected a mapping with arch and weights (or predictor), got {h!r}")
            unknown = sorted(set(h) - set(HEAD_KEYS))
            if unknown:
                raise ConfigError(f"heads.{name}: unknown key {unknown[0]!r}; known: {', '.join(HEAD_KEYS)}")
            if "predictor" in h:
                if "arch" in h or "weights" in h:
                    raise ConfigError(f"heads.{name}: give either predictor or arch and weights, not both")
                if not isinstance(h["predictor"], str) or h["predictor"] not in table:
                    raise ConfigError(f"heads.{name}: unknown predictor {h['predictor']!r}; built-in: "
                                      f"{', '.join(n for n, p in table.items() if p.builtin)} (or declare it under "
                                      "predictors:)")
            else:
                for key in ("arch", "weights"):
                    if not isinstance(h.get(key), str) or not h[key]:
                        raise ConfigError(f"heads.{name}: {key} is required (e.g. {{arch: linear, weights: head.pth}} "
                                          "or {predictor: NAME})")
            if name in BUILTIN and BUILTIN[name].option and getattr(self, BUILTIN[name].option):
                raise ConfigError(f"heads.{name}: its weights are also given by {BUILTIN[name].option} "
                                  f"({BUILTIN[name].flag}); give them once")
            arch = table[h["predictor"]].arch if "predictor" in h else h["arch"]
            declared_score(name, arch, h.get("label"))  # raises for a bad name or arch

    def to_dict(self) -> dict:
        """The config as the manifest records it."""
        return {k: v for k, v in self.__dict__.items() if k not in ("overwrite", "break_lock")}

    def fingerprint(self) -> dict:
        """What decides the outputs: a rerun into the same OUTPUT must match it to resume."""
        keys = ("mode", "clip_model", "clip_pretrained", "aesthetic_head", "watermark_head", "nsfw_head",
                "similarity", "embeddings", "max_image_pixels", "exif_transpose", "detect_generated", "precision")
        if self.compile:  # only when on: compiled kernels may round differently
            keys += ("compile",)
        if self.fast_decode:  # only when on: runs without it keep their fingerprint
            keys += ("fast_decode",)
        if self.mode == "urls":  # the fetch settings that change what is stored (timeouts do not)
            keys += ("urls_per_shard", "resize_max_side", "opt_out_directives")
        out = {"rules": self.all_rules(), **{k: getattr(self, k) for k in keys}}
        if self.heads:  # only when declared: runs without keep their fingerprint
            out["heads"] = {n: ({"predictor": h["predictor"]} if h.get("predictor") else
                                {"arch": h["arch"], "weights": h["weights"]}) for n, h in self.heads.items()}
        used = {s.predictor.name: s.predictor for s in self.head_specs().values() if s.predictor is not None}
        if used:  # where each named predictor comes from and its pin (the run adds the hashes it verified)
            out["predictors"] = {n: {"url": p.url, "format": p.format, "sha256": p.sha256} for n, p in used.items()}
        return out

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
        for key in ("lock_ttl", "stall_timeout"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0 seconds, got {getattr(self, key)}")
        if self.num_actors < 0 or self.actor_cpus < 0:
            raise ConfigError("num_actors / actor_cpus: must be >= 0 (0 = automatic)")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision: {self.precision!r} is not one of auto, fp32, bf16, fp16")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        self.predictor_table()  # raises for a bad predictors entry
        self.check_heads()
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


def parse_head_flag(text: str) -> tuple[str, dict]:
    """``--head NAME=ARCH:PATH`` -> (NAME, {arch, weights}); PATH may be any fsspec URL.
    ``--head NAME=PREDICTOR`` (no colon) -> (NAME, {predictor})."""
    name, sep, rest = text.partition("=")
    arch, sep2, path = rest.partition(":")
    if sep and name and rest and not sep2:
        return name.strip(), {"predictor": rest.strip()}
    if not (sep and sep2 and name and arch and path):
        raise ConfigError(f"--head {text!r}: expected NAME=ARCH:PATH, e.g. pcartoon=linear:s3://models/cartoon.pth, "
                          "or NAME=PREDICTOR")
    return name.strip(), {"arch": arch.strip(), "weights": path.strip()}


def pin_predictor_flag(predictors: dict[str, dict], text: str) -> dict[str, dict]:
    """``--predictor-sha256 NAME=HEX``: the ``predictors`` config with NAME pinned to HEX."""
    from shardsmith.filters.predictors import pin

    name = text.partition("=")[0].strip()
    table = pin(predictor_table(predictors), text)  # checks NAME and HEX
    entry = dict(predictors.get(name, {}))
    entry["sha256"] = table[name].sha256
    return {**predictors, name: entry}


def config_from_dict(data: dict, base: CurateConfig | None = None, source: str = "config") -> CurateConfig:
    from shardsmith.pipelines.config.base import from_dict

    return from_dict(CurateConfig, data, base, source)
