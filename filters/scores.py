"""The score registry: every score a run can compute, declared once.

A score is a float column of ``scores/*.parquet`` and a field the rules can read. Its entry says
what it consumes (the CLIP image embedding, the embedding and the caption, or the pixels), its
valid range, its label, and how its weights are given (a head architecture and a file). Everything
that lists scores follows from here: the batch the scoring stage writes, the parquet schema, the
rule fields and their ranges, the built-in heads' CLI flags and config keys, the report's
histograms, ``inspect``'s columns and the LAION metadata column map.

The built-in scores are the LAION columns. A run adds its own heads (``heads:`` in the config,
``--head NAME=ARCH:PATH`` on the command line) with :func:`declared_score`; a run's scores, in
column order, are a :class:`ScoreSet`, recorded in its manifest so that the report and ``inspect``
read the same list back.

This module imports nothing heavy (no torch): the CLI builds its flags from it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from shardsmith.errors import ConfigError

EMBEDDING = "embedding"  # the L2-normalised CLIP image embedding
EMBEDDING_AND_CAPTION = "embedding+caption"  # and the caption's text embedding
PIXELS = "pixels"  # the image itself (a model of its own, not a CLIP head)

INF = math.inf
PROBABILITY = (0.0, 1.0)
UNBOUNDED = (-INF, INF)


@dataclass(frozen=True)
class PixelInput:
    """The image input of a model that reads pixels (not the CLIP embedding): decoded once with the
    CLIP input, from the same image, and resized to ``size`` (height, width) as torchvision's
    ``Resize(size)`` does (a squash, not a crop); the model normalises with ``mean``/``std``.
    The decode stage writes it as the uint8 column ``pixels_NAME`` (``stages/batch.py``)."""

    name: str
    size: tuple[int, int]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def column(self) -> str:
        return f"pixels_{self.name}"


SQUASH_256 = PixelInput("squash256", (256, 256))


@dataclass(frozen=True)
class HeadArch:
    """A head architecture: what its weights file holds, the range of its output, and what it reads
    (the CLIP embedding, or pixels of its own ``pixel_input``)."""

    name: str
    output: tuple[float, float]
    weights: str  # the state dict layout, for messages and the README
    consumes: str = EMBEDDING
    pixel_input: PixelInput | None = None


# The head architectures (filters/heads.py implements each; a test checks the two tables agree).
HEAD_ARCHS: dict[str, HeadArch] = {a.name: a for a in (
    HeadArch("linear", UNBOUNDED, "nn.Linear(D, 1) state dict: weight [1, D], bias [1] (LAION's v1 aesthetic "
             "heads sa_0_4_vit_*_linear.pth); raw output"),
    HeadArch("probability", PROBABILITY, "layers.N.weight/bias: Linear layers with ReLU between, one logit out; "
             "sigmoid output (logistic regression with one layer)"),
    HeadArch("mlp", UNBOUNDED, "layers.N.weight/bias: Linear layers with ReLU between (sizes and positions read "
             "from the file, Dropout positions skipped); raw output"),
    HeadArch("laion-aesthetic", UNBOUNDED, "the LAION improved aesthetic predictor's state dict "
             "(layers.0/2/4/6/7, no activations; sac+logos+ava1-l14-linearMSE.pth loads as is)"),
    HeadArch("laion-nsfw", PROBABILITY, "LAION's CLIP-based NSFW detector: norm_mean, norm_var, "
             "layers.0/2/4/6 (64 -> 512 -> 256 -> 1, ReLU, sigmoid; sizes read from the file, so the B/32 "
             "detector's 32 -> 32 -> 1 loads too); what `shardsmith convert-predictor` writes from the Keras model"),
    HeadArch("laion-nsfw-torch", PROBABILITY, "the PyTorch port of LAION's NSFW detector (NeMo Curator's "
             "clip_autokeras_binary_nsfw.pth): norm.mean, norm.variance, linear_1..linear_4"),
    HeadArch("laion-watermark-effnet", PROBABILITY, "LAION-5B-WatermarkDetection's watermark_model_v1.pt: a timm "
             "efficientnet_b3 state dict, classifier Linear(1536, 625) -> ReLU -> Dropout -> Linear(625, 256) -> "
             "ReLU -> Linear(256, 2); reads the image squashed to 256x256, softmax index 0 = watermark",
             consumes=PIXELS, pixel_input=SQUASH_256),
)}


@dataclass(frozen=True)
class Score:
    """One score column."""

    name: str
    label: str  # for people: report titles and axes
    short: str  # for tables: inspect's and the report tiles' column heads
    consumes: str  # EMBEDDING | EMBEDDING_AND_CAPTION | PIXELS
    range: tuple[float, float]  # a value outside is bad data (an error row); a rule threshold outside, a config error
    arch: str | None = None  # the head architecture its weights have; None: it needs no weights (similarity)
    option: str | None = None  # built-in heads: the config key (and, spelled with dashes, the CLI flag) of its weights
    laion: tuple[str, ...] = ()  # the spellings of its column in LAION metadata (compared case-insensitively)
    builtin: bool = False
    about: str = ""  # what its weights are, for --help

    @property
    def probability(self) -> bool:
        return tuple(self.range) == PROBABILITY

    @property
    def flag(self) -> str | None:
        return "--" + self.option.replace("_", "-") if self.option else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["range"] = [_json_float(v) for v in self.range]
        d["laion"] = list(self.laion)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Score":
        d = dict(d)
        d["range"] = tuple(float(v) for v in d.get("range", UNBOUNDED))
        d["laion"] = tuple(d.get("laion", ()))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _json_float(v: float):
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


BUILTIN: dict[str, Score] = {s.name: s for s in (
    Score("aesthetic", "aesthetic score", "aes", EMBEDDING, UNBOUNDED, arch="laion-aesthetic",
          option="aesthetic_head", laion=("aesthetic_score", "aesthetic"), builtin=True,
          about="LAION improved aesthetic predictor weights (a file such as sac+logos+ava1-l14-linearMSE.pth, or a "
                "predictor: laion-aesthetic-v2)"),
    Score("pwatermark", "watermark probability", "wm", EMBEDDING, PROBABILITY, arch="probability",
          option="watermark_head", laion=("pwatermark",), builtin=True,
          about="watermark probability head weights (e.g. one made by shardsmith fit-head), or the predictor "
                "laion-watermark-effnet (LAION's own image classifier)"),
    Score("punsafe", "NSFW probability", "nsfw", EMBEDDING, PROBABILITY, arch="laion-nsfw",
          option="nsfw_head", laion=("punsafe",), builtin=True,
          about="NSFW head weights (LAION CLIP-based detector architecture), or a predictor: laion-nsfw-l14"),
    Score("similarity", "image-caption similarity", "sim", EMBEDDING_AND_CAPTION, (-1.0, 1.0),
          laion=("similarity",), builtin=True),
)}
BUILTIN_HEADS = tuple(s for s in BUILTIN.values() if s.arch)  # the built-ins that take weights

# Columns of the scores parquet and fields of the rules that are not scores: a head may not take
# one of these names.
RESERVED = {"key", "row", "status", "reason", "error", "original_width", "original_height", "caption", "url",
            "generated", "min_side", "max_side", "aspect_ratio", "caption_length", "shard", "embedding",
            "pixels", "image", "error_kind", "node_id", "scorer", "shard_rows"}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(frozen=True)
class HeadSpec:
    """How one head's weights are given: an architecture and a weights file (local or fsspec), or a
    named predictor (``filters/predictors.py``: a pinned URL, fetched once into the cache and
    verified). For a predictor ``weights`` is where it was found on the machine that resolved it
    (a hint other processes of that machine use, never recorded)."""

    arch: str
    weights: str
    predictor: "object | None" = None  # a filters.predictors.Predictor

    def to_dict(self) -> dict:
        if self.predictor is not None:
            return {"arch": self.arch, "predictor": self.predictor.to_dict()}
        return {"arch": self.arch, "weights": self.weights}

    @property
    def consumes(self) -> str:
        return HEAD_ARCHS[self.arch].consumes if self.arch in HEAD_ARCHS else EMBEDDING


def declared_score(name: str, arch: str, label: str | None = None) -> Score:
    """The score of a head declared in a config or with ``--head``. Its range is its
    architecture's output range. A built-in name keeps its entry (label, range, LAION column) and
    takes the declared architecture, if that architecture's output fits the score's range."""
    if arch not in HEAD_ARCHS:
        raise ConfigError(f"head {name!r}: unknown arch {arch!r}; known: {', '.join(HEAD_ARCHS)}")
    out, consumes = HEAD_ARCHS[arch].output, HEAD_ARCHS[arch].consumes
    if name in BUILTIN:
        b = BUILTIN[name]
        if not b.arch:
            raise ConfigError(f"head {name!r}: {name} is computed from the CLIP embeddings, it takes no weights")
        if not (b.range[0] <= out[0] and out[1] <= b.range[1]):
            raise ConfigError(f"head {name!r}: arch {arch} gives values in [{out[0]:g}, {out[1]:g}], outside the "
                              f"range of {name} [{b.range[0]:g}, {b.range[1]:g}]")
        return Score(b.name, label or b.label, b.short, consumes, b.range, arch, b.option, b.laion, True, b.about)
    if not _NAME.match(name) or name in RESERVED:
        why = "is a column or field name of its own" if name in RESERVED else \
            "must be lower case letters, digits and '_', starting with a letter"
        raise ConfigError(f"head {name!r}: the name {why}")
    return Score(name, label or name, name[:8], consumes, out, arch)


class ScoreSet:
    """The scores of one run, in column order: the four built-ins (always columns, null when not
    computed), then the heads the run declares."""

    def __init__(self, scores: list[Score]):
        self._scores = {s.name: s for s in scores}

    @classmethod
    def for_run(cls, declared: list[Score] = ()) -> "ScoreSet":
        scores = dict(BUILTIN)
        for s in declared:
            scores[s.name] = s  # a built-in keeps its place
        return cls(list(scores.values()))

    @classmethod
    def from_list(cls, items: list[dict] | None) -> "ScoreSet":
        """From a manifest's ``models.scores``; runs written before the registry have the built-ins."""
        return cls([Score.from_dict(d) for d in items]) if items else cls.for_run()

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ScoreSet":
        return cls.from_list((manifest.get("models") or {}).get("scores"))

    def to_list(self) -> list[dict]:
        return [s.to_dict() for s in self]

    def __iter__(self):
        return iter(self._scores.values())

    def __contains__(self, name: str) -> bool:
        return name in self._scores

    def __getitem__(self, name: str) -> Score:
        return self._scores[name]

    def __len__(self) -> int:
        return len(self._scores)

    @property
    def names(self) -> list[str]:
        return list(self._scores)

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {s.name: s.range for s in self}

    def label(self, name: str) -> str:
        return self._scores[name].label if name in self._scores else name

    def laion_columns(self) -> dict[str, tuple[str, ...]]:
        return {s.name: s.laion for s in self if s.laion}
