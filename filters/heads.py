"""Score heads on the L2-normalised CLIP image embedding: one class per head architecture.

Every head is a small torch module that maps a batch of normalised embeddings (N, D) to one score
per row. Weights are loaded only through safe paths: ``torch.load(weights_only=True)`` for
``.pt/.pth/.bin`` state dicts, or safetensors. The input width D is read from the weights, so the
same code serves the original ViT-L/14 heads (D=768) and tiny test models. The architectures
(``filters.scores.HEAD_ARCHS`` describes their files and output ranges):

- ``linear``: ``LinearHead``, an ``nn.Linear(D, 1)`` state dict (keys ``weight``, ``bias``), the layout
  of LAION's v1 aesthetic heads ``sa_0_4_vit_*_linear.pth``; raw output.
- ``probability``: ``ProbabilityHead``, Linear layers with ReLU between, sigmoid output; the
  watermark score, and what ``shardsmith fit-head`` fits (``filters/fit.py``).
- ``mlp``: ``MLPHead``, the same stack with raw output (a regression head; LAION's ReLU aesthetic
  variant ``ava+logos-l14-reluMSE.pth`` loads as is).
- ``laion-aesthetic``: ``AestheticMLP``, the LAION improved aesthetic predictor
  (christophschuhmann/improved-aesthetic-predictor). Same layers and state-dict keys as the original
  ``sac+logos+ava1-l14-linearMSE.pth`` (``layers.0/2/4/6/7``), so that file loads as is.
- ``laion-nsfw``: ``NsfwHead``, the architecture of LAION's CLIP-based NSFW detector
  (``Normalization(mean, var) -> 64 ReLU -> 512 ReLU -> 256 ReLU -> 1 sigmoid``), 1 = unsafe;
  what ``shardsmith convert-predictor`` writes from LAION's Keras SavedModel.
- ``laion-nsfw-torch``: ``NsfwTorchHead``, the same detector in its PyTorch port's keys.
- ``laion-watermark-effnet``: ``WatermarkEffnet``, LAION-5B-WatermarkDetection's EfficientNet-B3
  image classifier: not a head on the embedding but a model on its own 256x256 pixels, run in the
  same scoring actor (the decode stage prepares its input from the same decoded image).

``load_head_spec`` turns a :class:`~shardsmith.filters.scores.HeadSpec` (an arch and a weights file,
or a named predictor) into a loaded module: the one way every job gets a head.
"""

from __future__ import annotations

import torch
from torch import nn

from shardsmith.filters.scores import BUILTIN, HEAD_ARCHS, SQUASH_256, HeadSpec
from shardsmith.filters.weights import WeightsError as HeadLoadError
from shardsmith.filters.weights import read_state_dict


class LinearHead(nn.Module):
    """``nn.Linear(D, 1)`` on the embedding, raw output (LAION's v1 aesthetic heads)."""

    def __init__(self, input_size: int):
        super().__init__()
        self.linear = nn.Linear(input_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "LinearHead":
        _check_keys(sd, {"weight", "bias"}, "linear head (nn.Linear(D, 1) state dict)")
        if sd["weight"].ndim != 2 or sd["weight"].shape[0] != 1:
            raise HeadLoadError(f"weight has shape {list(sd['weight'].shape)}, expected [1, D]")
        head = cls(sd["weight"].shape[1])
        head.linear.load_state_dict(sd, strict=True)
        return head


class AestheticMLP(nn.Module):
    """LAION improved aesthetic predictor. Output is unclipped, ~1-10 on real embeddings."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "AestheticMLP":
        expected = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
        _check_keys(sd, expected, "aesthetic (LAION improved aesthetic predictor)")
        head = cls(input_size=sd["layers.0.weight"].shape[1])
        head.load_state_dict(sd, strict=True)
        return head


class NsfwHead(nn.Module):
    """LAION CLIP-based NSFW detector: keras-style Normalization then a Linear/ReLU stack ending in
    one logit, sigmoid output (the L/14 detector: 64-512-256-1; the B/32 one: 32-32-1). Keys
    ``norm_mean``, ``norm_var``, ``layers.0/2/4/...``; the sizes are read from the file."""

    def __init__(self, input_size: int = 768, hidden: tuple[int, ...] = (64, 512, 256), eps: float = 1e-7):
        super().__init__()
        self.eps = eps
        self.register_buffer("norm_mean", torch.zeros(input_size))
        self.register_buffer("norm_var", torch.ones(input_size))
        sizes = [input_size, *hidden, 1]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                mods.append(nn.ReLU())
        self.layers = nn.Sequential(*mods)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        # keras.layers.Normalization: (x - mean) / maximum(sqrt(var), epsilon), epsilon 1e-7
        return (x - self.norm_mean) / torch.clamp(torch.sqrt(self.norm_var), min=self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.layers(self.normalize(x))).squeeze(-1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "NsfwHead":
        what = "punsafe (LAION CLIP-based NSFW detector)"
        n = len([k for k in sd if k.startswith("layers.") and k.endswith(".weight")])
        if "layers.0.weight" not in sd or n < 1:
            _check_keys(sd, {"norm_mean", "norm_var", "layers.0.weight", "layers.0.bias"}, what)
        expected = {"norm_mean", "norm_var"} | {f"layers.{2 * i}.{p}" for i in range(n) for p in ("weight", "bias")}
        _check_keys(sd, expected, what)
        hidden = tuple(int(sd[f"layers.{2 * i}.weight"].shape[0]) for i in range(n - 1))
        if sd[f"layers.{2 * (n - 1)}.weight"].shape[0] != 1:
            raise HeadLoadError(f"{what}: the last layer has {sd[f'layers.{2 * (n - 1)}.weight'].shape[0]} outputs, "
                                "expected 1")
        head = cls(input_size=sd["layers.0.weight"].shape[1], hidden=hidden)
        head.load_state_dict(sd, strict=True)
        return head


class NsfwTorchHead(nn.Module):
    """The PyTorch port of LAION's NSFW detector (NeMo Curator's ``clip_autokeras_binary_nsfw.pth``):
    ``norm.mean``, ``norm.variance``, ``linear_1..linear_4``; ``(x - mean) / sqrt(variance)``, then
    Linear/ReLU x3, Linear, sigmoid. Its keys load as they are."""

    class Normalization(nn.Module):
        def __init__(self, size: int):
            super().__init__()
            self.register_buffer("mean", torch.zeros(size))
            self.register_buffer("variance", torch.ones(size))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - self.mean) / self.variance.sqrt()

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.norm = self.Normalization(sizes[0])
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            setattr(self, f"linear_{i}", nn.Linear(a, b))
        self.n = len(sizes) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for i in range(1, self.n):
            x = torch.relu(getattr(self, f"linear_{i}")(x))
        return torch.sigmoid(getattr(self, f"linear_{self.n}")(x)).squeeze(-1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "NsfwTorchHead":
        n = len([k for k in sd if k.startswith("linear_") and k.endswith(".weight")])
        expected = {"norm.mean", "norm.variance"} | {f"linear_{i}.{p}" for i in range(1, n + 1)
                                                     for p in ("weight", "bias")}
        _check_keys(sd, expected if n else expected | {"linear_1.weight"}, "laion-nsfw-torch (NSFW detector, PyTorch port)")
        sizes = [int(sd["linear_1.weight"].shape[1])] + [int(sd[f"linear_{i}.weight"].shape[0]) for i in range(1, n + 1)]
        if sizes[-1] != 1:
            raise HeadLoadError(f"linear_{n} has {sizes[-1]} outputs, expected 1")
        head = cls(sizes)
        head.load_state_dict({k: v.reshape(-1) if k.startswith("norm.") else v for k, v in sd.items()}, strict=True)
        return head


class WatermarkEffnet(nn.Module):
    """LAION-5B-WatermarkDetection's watermark classifier: timm ``efficientnet_b3`` (``efficientnet_b3a``
    is its deprecated alias) with ``num_classes=2`` and the classifier replaced by
    Linear(1536, 625) -> ReLU -> Dropout(0.3) -> Linear(625, 256) -> ReLU -> Linear(256, 2). Reads
    the image squashed to 256x256 (``filters.scores.SQUASH_256``), ImageNet-normalised; returns
    softmax index 0 (= watermark), the ``pwatermark`` column of LAION-5B."""

    pixel_input = SQUASH_256

    def __init__(self):
        super().__init__()
        import timm

        model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
        model.classifier = nn.Sequential(nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(p=0.3), nn.Linear(625, 256),
                                         nn.ReLU(), nn.Linear(256, 2))
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x).float(), dim=1)[:, 0]

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "WatermarkEffnet":
        head = cls()
        expected = set(head.model.state_dict())
        _check_keys(sd, expected, "laion-watermark-effnet (timm efficientnet_b3, LAION watermark classifier)")
        shapes = [k for k, v in head.model.state_dict().items() if tuple(v.shape) != tuple(sd[k].shape)]
        if shapes:
            k = shapes[0]
            raise HeadLoadError(f"{k} has shape {list(sd[k].shape)}, expected {list(head.model.state_dict()[k].shape)} "
                                "(not an efficientnet_b3 state dict)")
        head.model.load_state_dict(sd, strict=True)
        return head


class MLPHead(nn.Module):
    """Linear layers with a ReLU between consecutive ones (``layers.N``, N read from the file),
    raw output. Dropout positions of a file saved in training layout are skipped (identity in
    eval mode), so e.g. keys ``layers.0/3/6/9/11`` load as they are."""

    sigmoid = False

    def __init__(self, sizes: list[int], positions: list[int] | None = None):
        super().__init__()
        positions = positions or [2 * i for i in range(len(sizes) - 1)]
        mods: dict[int, nn.Module] = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            mods[positions[i]] = nn.Linear(a, b)
            if i < len(sizes) - 2:
                mods[positions[i] + 1] = nn.ReLU()
        top = max(mods)
        self.layers = nn.Sequential(*[mods.get(j, nn.Identity()) for j in range(top + 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x).squeeze(-1)
        return torch.sigmoid(y) if self.sigmoid else y

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]):
        idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.") and k.split(".")[1].isdigit()})
        if not idx:
            raise HeadLoadError("no 'layers.N.weight' keys: not a Linear/ReLU stack state dict")
        missing = [i for i in idx if f"layers.{i}.weight" not in sd]
        if missing:
            raise HeadLoadError(f"layers.{missing[0]} has no weight")
        if any(b - a < 2 for a, b in zip(idx[:-1], idx[1:])):
            raise HeadLoadError(f"layers at positions {idx}: consecutive Linear layers need a ReLU between them "
                                "(for LAION's linearMSE aesthetic layout use arch laion-aesthetic)")
        sizes = [sd[f"layers.{idx[0]}.weight"].shape[1]] + [sd[f"layers.{i}.weight"].shape[0] for i in idx]
        if sizes[-1] != 1:
            raise HeadLoadError(f"last layer has {sizes[-1]} outputs, expected 1")
        head = cls(sizes, idx)
        expected = {f"layers.{i}.{p}" for i in idx for p in ("weight", "bias")}
        _check_keys(sd, expected, f"{cls.__name__} (Linear/ReLU stack)")
        head.load_state_dict(sd, strict=True)
        return head


class ProbabilityHead(MLPHead):
    """Binary classifier on the embedding: the Linear/ReLU stack ending in one logit, sigmoid output.

    With no hidden layer it is a logistic regression. The layer sizes are read from the weights.
    """

    sigmoid = True


# The architectures of filters.scores.HEAD_ARCHS (a test checks both tables name the same ones).
ARCH_CLASSES = {"linear": LinearHead, "probability": ProbabilityHead, "mlp": MLPHead,
                "laion-aesthetic": AestheticMLP, "laion-nsfw": NsfwHead, "laion-nsfw-torch": NsfwTorchHead,
                "laion-watermark-effnet": WatermarkEffnet}


def _check_keys(sd: dict, expected: set[str], what: str) -> None:
    keys = set(sd)
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    if missing or unexpected:
        raise HeadLoadError(
            f"state dict does not match the {what} architecture: "
            f"missing keys {missing or 'none'}, unexpected keys {unexpected or 'none'}"
        )


def guess_arch(sd: dict) -> str | None:
    """The architecture whose key layout a state dict has, for error messages."""
    keys = set(sd)
    if keys == {"weight", "bias"}:
        return "linear"
    if "norm_mean" in keys:
        return "laion-nsfw"
    if "norm.mean" in keys:
        return "laion-nsfw-torch"
    if "conv_stem.weight" in keys:
        return "laion-watermark-effnet"
    if {f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)} <= keys:
        return "laion-aesthetic"
    if "layers.0.weight" in keys:
        return "mlp or probability"
    return None


def input_dim(head: nn.Module) -> int | None:
    """The embedding width a head reads (None for a model that reads pixels)."""
    if getattr(head, "pixel_input", None) is not None:
        return None
    return next(iter(head.parameters())).shape[1]


def load_head(name: str, path: str, embed_dim: int | None = None, arch: str | None = None) -> nn.Module:
    """Build head ``name`` from the weights at ``path`` with architecture ``arch`` (default: the
    built-in score's own: aesthetic laion-aesthetic, pwatermark probability, punsafe laion-nsfw)."""
    arch = arch or (BUILTIN[name].arch if name in BUILTIN else None)
    if arch not in ARCH_CLASSES:
        raise HeadLoadError(f"head {name!r}: unknown arch {arch!r}; known: {', '.join(HEAD_ARCHS)}")
    sd = read_state_dict(path)
    try:
        head = ARCH_CLASSES[arch].from_state_dict(sd)
    except HeadLoadError as e:
        guess = guess_arch(sd)
        hint = f" (its keys are those of arch {guess})" if guess and guess != arch else ""
        raise HeadLoadError(f"{path}: {e}{hint}") from e
    in_dim = input_dim(head)
    if embed_dim is not None and in_dim is not None and in_dim != embed_dim:
        raise HeadLoadError(
            f"{path}: the {name} head expects {in_dim}-d embeddings but the CLIP model gives "
            f"{embed_dim}-d (the LAION heads need ViT-L-14-quickgelu/openai, 768-d)"
        )
    return head.eval()


def card_url(weights: str) -> str:
    """Where a head's card is: ``WEIGHTS.json``, the suffix on the path (a signed URL's query
    stays after it)."""
    from urllib.parse import urlsplit, urlunsplit

    if "://" not in weights:
        return weights + ".json"
    u = urlsplit(weights)
    return urlunsplit(u._replace(path=u.path + ".json"))


def head_card(weights: str) -> dict | None:
    """The card ``shardsmith fit-head`` writes beside a head (``WEIGHTS.json``), or None."""
    import json

    import fsspec

    url = card_url(weights)
    try:
        with fsspec.open(url, "rt") as f:
            card = json.load(f)
    except FileNotFoundError:
        return None
    except Exception as e:
        raise HeadLoadError(f"{url}: the head's card is not readable JSON: {type(e).__name__}: {e}") from e
    return card if isinstance(card, dict) and card.get("kind") == "shardsmith-head" else None


def check_card(name: str, weights: str, clip_model: str | None, clip_pretrained: str | None) -> None:
    """A head fitted by ``fit-head`` reads the embeddings of the CLIP model its card names: a run
    with another CLIP model is refused (dimensions may agree, the scores would not)."""
    from shardsmith.filters.predictors import clip_name

    card = head_card(weights)
    if card is None or clip_model is None or not card.get("clip"):
        return
    ours = clip_name(clip_model, clip_pretrained)
    if card["clip"] != ours:
        raise HeadLoadError(f"{weights} was fitted on {card['clip']} embeddings (its card "
                            f"{weights}.json) but this run's CLIP is {ours}; refit it with this CLIP model "
                            "(shardsmith fit-head) or run with that one")


def pin_heads(heads: dict[str, HeadSpec], log=None) -> dict[str, HeadSpec]:
    """The heads with every named predictor fetched (once, into this machine's cache), verified
    and pinned: its sha256 and size are what was verified, and ``weights`` the cached file (a hint
    the other processes of this machine use). Done by the driver before any work, so that the run
    records each predictor's hash and the actors require that same file."""
    from shardsmith.filters.predictors import resolve

    out = {}
    for name, spec in heads.items():
        p = spec.predictor
        if p is None:
            out[name] = spec
            continue
        r = resolve(p, hint=spec.weights or None)
        if log and r.downloaded:
            log(f"predictor {p.name}: fetched {p.url} ({r.predictor.size} bytes, sha256 {r.predictor.sha256})")
        if log and p.sha256 is None:
            log(f"predictor {p.name}: no sha256 pinned; using the file with sha256 {r.predictor.sha256} (recorded in "
                f"the manifest; pin it with --predictor-sha256 {p.name}={r.predictor.sha256})")
        out[name] = HeadSpec(spec.arch, r.source, r.predictor)
    return out


def load_head_spec(name: str, spec: HeadSpec, embed_dim: int | None = None, clip_model: str | None = None,
                   clip_pretrained: str | None = None) -> nn.Module:
    """The head module of ``spec``: an arch and a weights file (a fit-head card beside it is
    checked against the CLIP model given), or a named predictor (fetched, verified and converted
    as needed: ``filters/predictors.py``). The one way curate, recurate and the benchmarks get a
    head from a HeadSpec."""
    if spec.predictor is not None:
        from shardsmith.filters.predictors import resolve

        path = resolve(spec.predictor, hint=spec.weights or None).path
    else:
        path = spec.weights
        check_card(name, path, clip_model, clip_pretrained)
    return load_head(name, path, embed_dim=embed_dim, arch=spec.arch)
