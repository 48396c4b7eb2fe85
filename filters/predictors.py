"""Named predictors: LAION's published heads by name, fetched once, verified, cached.

A predictor is a weights file at a pinned URL with its sha256 and size where known, its
format (how the file is laid out, and so which head architecture loads it) and the CLIP model
whose embeddings it reads. ``--aesthetic-head laion-aesthetic-v2`` or ``heads: {punsafe:
{predictor: laion-nsfw-l14}}`` name one; a config may declare its own under ``predictors:``
(trusted as given: the address guard for URLs found in datasets does not apply to them).

Resolving a predictor (``resolve``) gives a local file a head architecture loads:

1. the file is looked up in the cache (``SHARDSMITH_CACHE``, ``filters/weights.py``), else fetched
   through fsspec into it: from ``SHARDSMITH_PREDICTOR_MIRROR/<host>/<path>`` when that is set
   (air-gapped clusters; a cache's ``predictors/`` folder has that layout, so it can be served
   over HTTP or named as a folder), else from the URL itself, which ``SHARDSMITH_OFFLINE`` /
   ``HF_HUB_OFFLINE`` forbid (a mirror the user set is still used: it is how air-gapped clusters
   get their files). A sha256 or size mismatch is refused, nothing cached. Where no pin is
   known the hash seen first is what the run records (and prints), and what the other processes
   of the run then require.
2. a zip holding one weights file is unpacked beside it; LAION's Keras SavedModel zip
   (``laion-nsfw-keras``) is converted to a ``laion-nsfw`` safetensors file
   (``filters/keras_nsfw.py``, no TensorFlow).

Every step happens under the cache entry's lock, so the actors of one node fetch once.
This module imports no torch (the CLI lists predictors from it).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, replace

from shardsmith.errors import ConfigError

L14 = "ViT-L-14-quickgelu/openai"
B32 = "ViT-B-32-quickgelu/openai"
B16 = "ViT-B-16-quickgelu/openai"

# format -> the head architecture (filters/scores.py HEAD_ARCHS) of the loadable file
FORMATS = {
    "laion-aesthetic": "laion-aesthetic",
    "linear": "linear",
    "probability": "probability",
    "mlp": "mlp",
    "laion-nsfw": "laion-nsfw",
    "laion-nsfw-torch": "laion-nsfw-torch",
    "laion-nsfw-keras": "laion-nsfw",  # converted to laion-nsfw on fetch
    "laion-watermark-effnet": "laion-watermark-effnet",
}
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
PREDICTOR_KEYS = ("url", "sha256", "size", "format", "clip", "about")


class PredictorError(ConfigError):
    """A predictor cannot be named, fetched or verified; the message says which and why."""


@dataclass(frozen=True)
class Predictor:
    name: str
    url: str
    format: str
    sha256: str | None = None  # None: not pinned (the hash seen first is recorded)
    size: int | None = None
    clip: str | None = None  # "MODEL/PRETRAINED" of the embeddings it reads (None: reads pixels, or unknown)
    score: str | None = None  # the column it is made for
    about: str = ""
    builtin: bool = False

    @property
    def arch(self) -> str:
        return FORMATS[self.format]

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in ("name", "url", "sha256", "size", "format", "clip")}


_GH = "https://github.com"
BUILTIN_PREDICTORS: dict[str, Predictor] = {p.name: p for p in (
    Predictor("laion-aesthetic-v2", f"{_GH}/christophschuhmann/improved-aesthetic-predictor/raw/main/"
              "sac%2Blogos%2Bava1-l14-linearMSE.pth", "laion-aesthetic",
              "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0", 3_714_759, L14, "aesthetic",
              "LAION improved aesthetic predictor (LAION-Aesthetics v2), sac+logos+ava1-l14-linearMSE.pth", True),
    Predictor("laion-aesthetic-v2-relu", f"{_GH}/christophschuhmann/improved-aesthetic-predictor/raw/main/"
              "ava%2Blogos-l14-reluMSE.pth", "mlp",
              "0af3254c651d55b7ea851429c20f26ec880bb0169805a4df85b814bd7966f3e4", 3_714_887, L14, "aesthetic",
              "the improved predictor's ReLU variant, ava+logos-l14-reluMSE.pth (layers.0/3/6/9/11)", True),
    Predictor("laion-aesthetic-v1-l14", f"{_GH}/LAION-AI/aesthetic-predictor/blob/main/"
              "sa_0_4_vit_l_14_linear.pth?raw=true", "linear",
              "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba", 4_071, L14, "aesthetic",
              "LAION aesthetic predictor v1, nn.Linear(768, 1)", True),
    Predictor("laion-aesthetic-v1-b32", f"{_GH}/LAION-AI/aesthetic-predictor/blob/main/"
              "sa_0_4_vit_b_32_linear.pth?raw=true", "linear",
              "c7b14cead230694acc7b9447974d3cad78003c72da032e402a303b6c2429e85f", 3_047, B32, "aesthetic",
              "LAION aesthetic predictor v1, nn.Linear(512, 1)", True),
    Predictor("laion-aesthetic-v1-b16", f"{_GH}/LAION-AI/aesthetic-predictor/blob/main/"
              "sa_0_4_vit_b_16_linear.pth?raw=true", "linear",
              "8ad3923d7ecf019df20ecd2ab5542a3075fbba0278d239c0371345f3d7fcbde0", 3_047, B16, "aesthetic",
              "LAION aesthetic predictor v1, nn.Linear(512, 1)", True),
    Predictor("laion-nsfw-l14", "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/"
              "clip_autokeras_binary_nsfw.zip", "laion-nsfw-keras",
              "905520bb0336accc73ee282c605d926aef90cf14248889d44b9cee50eef71f8a", 1_094_585, L14, "punsafe",
              "LAION CLIP-based NSFW detector (the punsafe column), the original Keras SavedModel, converted", True),
    Predictor("laion-nsfw-b32", "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/"
              "clip_autokeras_nsfw_b32.zip", "laion-nsfw-keras",
              "78715ab9d64485167e8c9ade3b8e6761a17a16c24d114bd47431ac1dab46462b", 231_831, B32, "punsafe",
              "LAION CLIP-based NSFW detector for ViT-B/32 (Keras only), converted", True),
    Predictor("laion-nsfw-l14-torch", f"{_GH}/LAION-AI/CLIP-based-NSFW-Detector/files/10250461/"
              "clip_autokeras_binary_nsfw.zip", "laion-nsfw-torch", None, None, L14, "punsafe",
              "the PyTorch port NeMo Curator downloads (clip_autokeras_binary_nsfw.pth in a zip); not pinned", True),
    Predictor("laion-watermark-effnet", f"{_GH}/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/"
              "watermark_model_v1.pt", "laion-watermark-effnet", None, None, None, "pwatermark",
              "LAION-5B-WatermarkDetection's EfficientNet-B3 (the pwatermark column of LAION-5B); an image "
              "model, not a CLIP head; not pinned", True),
)}


def predictor_table(declared: dict[str, dict] | None = None) -> dict[str, Predictor]:
    """The built-in predictors with a config's ``predictors:`` on top. An entry naming a built-in
    may give only ``sha256`` (a new pin for it); any other entry needs ``url`` and ``format``."""
    table = dict(BUILTIN_PREDICTORS)
    for name, d in (declared or {}).items():
        where = f"predictors.{name}"
        if not isinstance(d, dict):
            raise PredictorError(f"{where}: expected a mapping with url, sha256 and format, got {d!r}")
        unknown = sorted(set(d) - set(PREDICTOR_KEYS))
        if unknown:
            raise PredictorError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(PREDICTOR_KEYS)}")
        if not _NAME.match(str(name)):
            raise PredictorError(f"{where}: a predictor name is lower case letters, digits, '.', '-' and '_'")
        sha = d.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not _HEX.match(sha.lower())):
            raise PredictorError(f"{where}.sha256: expected 64 hex digits, got {sha!r}")
        sha = sha.lower() if sha else None
        size = d.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise PredictorError(f"{where}.size: expected a positive number of bytes, got {size!r}")
        if name in BUILTIN_PREDICTORS and set(d) <= {"sha256", "size"}:
            b = BUILTIN_PREDICTORS[name]
            table[name] = replace(b, sha256=sha or b.sha256, size=size if size is not None else
                                  (b.size if sha in (None, b.sha256) else None))
            continue
        for key in ("url", "format"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise PredictorError(f"{where}: {key} is required (e.g. {{url: https://models.example.org/h.pth, "
                                     "sha256: ..., format: probability}})")
        if d["format"] not in FORMATS:
            raise PredictorError(f"{where}.format: unknown format {d['format']!r}; known: {', '.join(FORMATS)}")
        table[name] = Predictor(name, d["url"], d["format"], sha, size, d.get("clip"), None, d.get("about", ""))
    return table


def pin(table: dict[str, Predictor], text: str) -> dict[str, Predictor]:
    """``--predictor-sha256 NAME=HEX``: the table with NAME pinned to HEX."""
    name, sep, hexd = text.partition("=")
    name, hexd = name.strip(), hexd.strip().lower()
    if not sep or not _HEX.match(hexd):
        raise PredictorError(f"--predictor-sha256 {text!r}: expected NAME=HEX (64 hex digits)")
    if name not in table:
        raise PredictorError(f"--predictor-sha256 {text!r}: unknown predictor {name!r}; known: {', '.join(table)}")
    p = table[name]
    return {**table, name: replace(p, sha256=hexd, size=p.size if hexd == p.sha256 else None)}


def clip_name(model: str, pretrained: str | None) -> str:
    """``MODEL/PRETRAINED`` as predictors and head cards record it: a config path by its file
    name without ``.json``, a checkpoint path by its file name."""
    m = os.path.basename(model)[:-5] if model.endswith(".json") else model
    p = pretrained or ""
    if "/" in p or os.sep in p or p.endswith(WEIGHT_SUFFIXES):
        p = os.path.basename(p.rstrip("/"))
    return f"{m}/{p}"


# ---- resolving a predictor to a loadable local file --------------------------------------------

@dataclass(frozen=True)
class Resolved:
    path: str  # the file its architecture loads
    source: str  # the fetched (verified) file it comes from
    predictor: Predictor  # pinned: sha256 and size are what was verified
    downloaded: bool


def mirror_url(url: str) -> str | None:
    base = os.environ.get("SHARDSMITH_PREDICTOR_MIRROR", "").strip()
    if not base:
        return None
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if base.startswith(("http://", "https://")):  # an HTTP server unquotes the path itself
        return f"{base.rstrip('/')}/{parts.netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")
    return f"{base.rstrip('/')}/{parts.netloc}{unquote(parts.path)}"  # a folder: the cache's own names


def resolve(p: Predictor, hint: str | None = None, cache_dir: str | None = None) -> Resolved:
    """The loadable local file of predictor ``p`` (see the module docstring). ``hint``: a fetched
    file another process of this machine resolved (used when it is there and verified)."""
    from shardsmith.filters import weights as w

    what = f"predictor {p.name}"
    local = w.is_local(p.url)
    if local:
        source = p.url[len("file://"):] if p.url.startswith("file://") else p.url
        if not os.path.exists(source):
            raise PredictorError(f"{what}: {p.url}: file not found")
        with w.entry_lock(_derived_dir(source, cache_dir)):
            sha, size = w.sha256_file(source), os.path.getsize(source)
            _check(p, sha, size, what)
            return Resolved(_loadable(p, source, cache_dir), source, replace(p, sha256=sha, size=size), False)
    if hint and os.path.exists(hint) and _note_ok(p, w.read_note(hint)):
        target = hint
    else:
        target = w.url_cache_path(p.url, "predictors", cache_dir)
    with w.entry_lock(target):
        note = w.read_note(target) if os.path.exists(target) else None
        if note and _note_ok(p, note):
            fetched = w.Fetched(target, note[0], note[1], False)
        else:
            source = mirror_url(p.url)
            offline = w.offline_reason()
            if source is None and offline:
                raise PredictorError(
                    f"{what}: {target} is not in the cache and {offline} forbids downloading {p.url}; run "
                    f"`shardsmith predictors fetch {p.name}` where the network is reachable and copy the cache "
                    "(SHARDSMITH_CACHE), or set SHARDSMITH_PREDICTOR_MIRROR")
            try:
                fetched = w.download_verified(source or p.url, target, p.sha256, p.size, what, url=p.url)
            except w.WeightsError as e:
                raise PredictorError(str(e)) from e
        path = _loadable(p, fetched.path, cache_dir)
    return Resolved(path, fetched.path, replace(p, sha256=fetched.sha256, size=fetched.size), fetched.downloaded)


def _note_ok(p: Predictor, note: tuple[str, int] | None) -> bool:
    return note is not None and (p.sha256 is None or note[0] == p.sha256) and (p.size is None or note[1] == p.size)


def _check(p: Predictor, sha: str, size: int, what: str) -> None:
    if p.sha256 and sha != p.sha256:
        raise PredictorError(f"{what}: {p.url} has sha256 {sha}, expected {p.sha256}: refused")
    if p.size and size != p.size:
        raise PredictorError(f"{what}: {p.url} has {size} bytes, expected {p.size}: refused")


def _derived_dir(source: str, cache_dir: str | None) -> str:
    """Where the files made from a local predictor file go (a zip's member, a conversion)."""
    import hashlib

    tag = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:16]
    return os.path.join(cache_dir or _cache(), "derived", tag, os.path.basename(source))


def _cache() -> str:
    from shardsmith.filters.weights import cache_root

    return cache_root()


def _loadable(p: Predictor, source: str, cache_dir: str | None) -> str:
    """The file the architecture loads: ``source`` itself, its one weights member (a zip), or
    its conversion (Keras). Made once, next to the cached file (called under its lock)."""
    import zipfile

    base = source if os.path.exists(f"{source}.sha256") else _derived_dir(source, cache_dir)  # a cache entry
    if p.format == "laion-nsfw-keras":
        out = f"{base}.laion-nsfw.safetensors"
        if not os.path.exists(out):
            from shardsmith.filters.keras_nsfw import convert_keras_nsfw

            convert_keras_nsfw(source, out)
        return out
    if not zipfile.is_zipfile(source):
        return source
    with zipfile.ZipFile(source) as z:
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist()):
            return source  # torch.save's own zip format: a weights file, not an archive of one
        members = [m for m in z.infolist() if not m.is_dir() and m.filename.endswith(WEIGHT_SUFFIXES)
                   and "__MACOSX" not in m.filename]
        if len(members) != 1:
            raise PredictorError(f"predictor {p.name}: {p.url} is a zip holding {len(members)} weights files "
                                 f"({', '.join(m.filename for m in members[:5]) or 'none'}); expected one")
        member = members[0]
        out = os.path.join(f"{base}.d", os.path.basename(member.filename))
        if not os.path.exists(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)
            tmp = f"{out}.tmp-{os.getpid()}"
            with z.open(member) as src, open(tmp, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
            os.replace(tmp, out)
    return out


def cached(p: Predictor, cache_dir: str | None = None) -> tuple[str, tuple[str, int] | None]:
    """(cache path, its recorded (sha256, size) or None when not cached) of a URL predictor."""
    from shardsmith.filters import weights as w

    target = w.url_cache_path(p.url, "predictors", cache_dir)
    return target, (w.read_note(target) if os.path.exists(target) else None)
