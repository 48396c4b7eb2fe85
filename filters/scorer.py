"""Embed once, score many: one CLIP image forward per sample feeds every head.

``Scorer`` holds the embedder and the heads that have weights; it has no Ray in it, so it is
used as is by the Ray actor in ``pipelines/stages/score.py``, by tests and by benchmarks. What it
computes is the run's :class:`~shardsmith.filters.scores.ScoreSet`: every score whose head has
weights, and the caption similarity when asked; the others are not computed (null columns).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from shardsmith.filters.clip import ClipEmbedder, ClipSpec
from shardsmith.filters.heads import load_head
from shardsmith.filters.scores import EMBEDDING_AND_CAPTION, HeadSpec, ScoreSet
from shardsmith.filters.weights import WeightsError


@dataclass(frozen=True)
class ScorerSpec:
    clip: ClipSpec = ClipSpec()
    heads: dict[str, HeadSpec] = field(default_factory=dict)  # score name -> architecture and weights
    similarity: bool = True
    scores: ScoreSet = field(default_factory=ScoreSet.for_run)
    precision: str = "fp32"  # the CLIP towers' (filters/clip.py PRECISIONS); heads and similarity run in fp32
    compile: bool = False  # torch.compile the image tower

    def computed(self) -> list[str]:
        """Score columns this spec computes, in column order (the others are null)."""
        return [s.name for s in self.scores
                if s.name in self.heads or (s.consumes == EMBEDDING_AND_CAPTION and self.similarity)]

    def not_computed(self) -> list[str]:
        done = set(self.computed())
        return [n for n in self.scores.names if n not in done]


def pick_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available here")
    return requested


class Scorer:
    def __init__(self, spec: ScorerSpec, device: str = "auto"):
        self.spec = spec
        self.device = pick_device(device)
        self.embedder = ClipEmbedder(spec.clip, device=self.device, precision=spec.precision, compile=spec.compile)
        self.heads = {}
        for name, head in spec.heads.items():
            try:
                module = load_head(name, head.weights, embed_dim=self.embedder.embed_dim, arch=head.arch)
            except WeightsError as e:
                raise WeightsError(f"head {name!r} ({head.arch}): {e}") from e
            self.heads[name] = module.to(self.device)

    @property
    def pixel_transform(self):
        return self.embedder.pixel_transform

    @torch.inference_mode()
    def score(self, pixels: np.ndarray, captions: list[str] | None = None,
              fixed_batch: int | None = None) -> dict[str, np.ndarray]:
        """pixels: uint8 (N, H, W, 3) from ``pixel_transform``. Returns float32 arrays of length
        N for every computed score, plus ``embedding`` (N, D) float32, L2-normalised.

        With ``fixed_batch`` every forward has exactly that many rows (the last chunk padded): a
        sample's scores then do not depend on which other samples share its batch, which makes a
        resumed or re-batched run bit-identical to an uninterrupted one (CPU GEMMs give slightly
        different results for different batch sizes)."""
        n = len(pixels)
        if fixed_batch is None or n == 0:
            return self._score(pixels, captions)
        parts = []
        for start in range(0, n, fixed_batch):
            px = pixels[start:start + fixed_batch]
            caps = captions[start:start + fixed_batch] if captions is not None else None
            pad = fixed_batch - len(px)
            if pad:
                px = np.concatenate([px, np.zeros((pad, *px.shape[1:]), dtype=px.dtype)])
                caps = list(caps) + [""] * pad if caps is not None else None
            out = self._score(px, caps)
            parts.append({k: v[:fixed_batch - pad] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _score(self, pixels: np.ndarray, captions: list[str] | None) -> dict[str, np.ndarray]:
        emb = self.embedder.embed_pixels(pixels)
        out: dict[str, np.ndarray] = {"embedding": emb}
        x = torch.from_numpy(emb).to(self.device)
        for name, head in self.heads.items():
            out[name] = head(x).float().cpu().numpy()
        if self.spec.similarity and captions is not None:
            txt = self.embedder.embed_texts([c or "" for c in captions])
            out["similarity"] = np.einsum("nd,nd->n", emb, txt).astype(np.float32)
        return out
