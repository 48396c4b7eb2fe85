"""Embed once, score many: one CLIP image forward per sample feeds every head.

``Scorer`` holds the embedder and the heads that have weights; it has no Ray in it, so it is
used as is by the Ray actor in ``pipelines/curate.py``, by tests and by benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from shardsmith.filters.clip import ClipEmbedder, ClipSpec
from shardsmith.filters.heads import load_head


@dataclass(frozen=True)
class ScorerSpec:
    clip: ClipSpec = ClipSpec()
    heads: dict[str, str] = field(default_factory=dict)  # score name -> weights path
    similarity: bool = True

    def computed(self) -> list[str]:
        """Score columns this spec computes (the others are null)."""
        return [h for h in ("aesthetic", "pwatermark", "punsafe") if self.heads.get(h)] + (
            ["similarity"] if self.similarity else [])


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
        self.embedder = ClipEmbedder(spec.clip, device=self.device)
        self.heads = {
            name: load_head(name, path, embed_dim=self.embedder.embed_dim).to(self.device)
            for name, path in spec.heads.items() if path
        }

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
