"""Score heads on the L2-normalised CLIP image embedding.

Every head is a small torch module that maps a batch of normalised embeddings (N, D) to one score
per row. Weights are loaded only through safe paths: ``torch.load(weights_only=True)`` for
``.pt/.pth/.bin`` state dicts, or safetensors. The input width D is read from the weights, so the
same code serves the original ViT-L/14 heads (D=768) and tiny test models.

- ``AestheticMLP``: the LAION improved aesthetic predictor
  (christophschuhmann/improved-aesthetic-predictor). Same layers and state-dict keys as the
  original ``sac+logos+ava1-l14-linearMSE.pth`` (``layers.0/2/4/6/7``), so that file loads as is.
- ``NsfwHead``: the architecture of LAION's CLIP-based NSFW detector
  (``Normalization(mean, var) -> 64 ReLU -> 512 ReLU -> 256 ReLU -> 1 sigmoid``), 1 = unsafe.
- ``ProbabilityHead``: a CLIP-embedding classifier (logistic regression or MLP) giving a
  probability; used for the watermark score, and fit with :func:`fit_probability_head`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shardsmith.filters.weights import WeightsError as HeadLoadError
from shardsmith.filters.weights import read_state_dict

HEAD_NAMES = ("aesthetic", "pwatermark", "punsafe")




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
    """LAION CLIP-based NSFW detector: keras-style Normalization then a 64-512-256-1 MLP."""

    def __init__(self, input_size: int = 768, eps: float = 1e-7):
        super().__init__()
        self.eps = eps
        self.register_buffer("norm_mean", torch.zeros(input_size))
        self.register_buffer("norm_var", torch.ones(input_size))
        self.layers = nn.Sequential(
            nn.Linear(input_size, 64),
            nn.ReLU(),
            nn.Linear(64, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.norm_mean) / torch.sqrt(torch.clamp(self.norm_var, min=self.eps))
        return torch.sigmoid(self.layers(x)).squeeze(-1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "NsfwHead":
        expected = {"norm_mean", "norm_var"} | {
            f"layers.{i}.{p}" for i in (0, 2, 4, 6) for p in ("weight", "bias")
        }
        _check_keys(sd, expected, "punsafe (LAION CLIP-based NSFW detector)")
        head = cls(input_size=sd["layers.0.weight"].shape[1])
        head.load_state_dict(sd, strict=True)
        return head


class ProbabilityHead(nn.Module):
    """Binary classifier on the embedding: ``layers`` is Linear(+ReLU)... ending in 1 logit.

    With no hidden layer it is a logistic regression. The layer sizes are read from the weights.
    """

    def __init__(self, sizes: list[int]):
        super().__init__()
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                mods.append(nn.ReLU())
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.layers(x)).squeeze(-1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "ProbabilityHead":
        idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
        if not idx:
            raise HeadLoadError("no 'layers.N.weight' keys: not a probability head state dict")
        sizes = [sd[f"layers.{idx[0]}.weight"].shape[1]] + [sd[f"layers.{i}.weight"].shape[0] for i in idx]
        if sizes[-1] != 1:
            raise HeadLoadError(f"last layer has {sizes[-1]} outputs, expected 1")
        head = cls(sizes)
        expected = {f"layers.{2 * j}.{p}" for j in range(len(idx)) for p in ("weight", "bias")}
        _check_keys(sd, expected, "probability head (Linear/ReLU stack)")
        head.load_state_dict(sd, strict=True)
        return head


HEAD_CLASSES = {"aesthetic": AestheticMLP, "pwatermark": ProbabilityHead, "punsafe": NsfwHead}


def _check_keys(sd: dict, expected: set[str], what: str) -> None:
    keys = set(sd)
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    if missing or unexpected:
        raise HeadLoadError(
            f"state dict does not match the {what} architecture: "
            f"missing keys {missing or 'none'}, unexpected keys {unexpected or 'none'}"
        )


def load_head(name: str, path: str, embed_dim: int | None = None) -> nn.Module:
    """Build head ``name`` (aesthetic | pwatermark | punsafe) from the weights at ``path``."""
    if name not in HEAD_CLASSES:
        raise HeadLoadError(f"unknown head {name!r}; known: {', '.join(HEAD_CLASSES)}")
    sd = read_state_dict(path)
    try:
        head = HEAD_CLASSES[name].from_state_dict(sd)
    except HeadLoadError as e:
        raise HeadLoadError(f"{path}: {e}") from e
    in_dim = next(iter(head.parameters())).shape[1]
    if embed_dim is not None and in_dim != embed_dim:
        raise HeadLoadError(
            f"{path}: the {name} head expects {in_dim}-d embeddings but the CLIP model gives "
            f"{embed_dim}-d (the LAION heads need ViT-L-14-quickgelu/openai, 768-d)"
        )
    return head.eval()


@dataclass
class FitResult:
    head: ProbabilityHead
    train_accuracy: float


def fit_probability_head(
    embeddings: np.ndarray, labels: np.ndarray, hidden: int = 0, epochs: int = 300, seed: int = 0
) -> FitResult:
    """Fit a watermark-style probability head on labelled (already normalised) embeddings."""
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32)
    sizes = [x.shape[1], hidden, 1] if hidden else [x.shape[1], 1]
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    head = ProbabilityHead(sizes)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(epochs):
        opt.zero_grad()
        logits = head.layers(x).squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float(((head(x) > 0.5).float() == y).float().mean())
    return FitResult(head.eval(), acc)
