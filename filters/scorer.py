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
from shardsmith.filters.heads import load_head_spec
from shardsmith.filters.scores import EMBEDDING_AND_CAPTION, HEAD_ARCHS, HeadSpec, PixelInput, ScoreSet
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

    def pixel_inputs(self) -> dict[str, PixelInput]:
        """The pixel columns the decode stage must add (by column name): one per input of a model
        that reads pixels (e.g. LAION's watermark classifier); none in most runs."""
        out = {}
        for h in self.heads.values():
            pi = HEAD_ARCHS[h.arch].pixel_input if h.arch in HEAD_ARCHS else None
            if pi is not None:
                out[pi.column] = pi
        return out


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
        self.heads = {}  # on the embedding
        self.pixel_heads = {}  # on pixels of their own: name -> (column, module)
        for name, head in spec.heads.items():
            try:
                module = load_head_spec(name, head, embed_dim=self.embedder.embed_dim, clip_model=spec.clip.model,
                                        clip_pretrained=spec.clip.pretrained)
            except WeightsError as e:
                raise WeightsError(f"head {name!r} ({head.arch}): {e}") from e
            pi = getattr(module, "pixel_input", None)
            if pi is not None:
                self.pixel_heads[name] = (pi, module.to(self.device))
            else:
                self.heads[name] = module.to(self.device)

    @property
    def pixel_transform(self):
        return self.embedder.pixel_transform

    @torch.inference_mode()
    def score(self, pixels: np.ndarray, captions: list[str] | None = None,
              fixed_batch: int | None = None, inputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """pixels: uint8 (N, H, W, 3) from ``pixel_transform``; ``inputs``: the pixel columns of the
        models that read pixels of their own (``spec.pixel_inputs()``, from the same images).
        Returns float32 arrays of length N for every computed score, plus ``embedding`` (N, D)
        float32, L2-normalised.

        With ``fixed_batch`` every forward has exactly that many rows (the last chunk padded): a
        sample's scores then do not depend on which other samples share its batch, which makes a
        resumed or re-batched run bit-identical to an uninterrupted one (CPU GEMMs give slightly
        different results for different batch sizes)."""
        n = len(pixels)
        inputs = inputs or {}
        missing = [pi.column for pi, _ in self.pixel_heads.values() if pi.column not in inputs]
        if missing:
            raise ValueError(f"score(): the pixel input(s) {missing} of {list(self.pixel_heads)} are missing")
        if fixed_batch is None or n == 0:
            return self._score(pixels, captions, inputs)

        def pad_to(a: np.ndarray, pad: int) -> np.ndarray:
            return np.concatenate([a, np.zeros((pad, *a.shape[1:]), dtype=a.dtype)]) if pad else a

        parts = []
        for start in range(0, n, fixed_batch):
            px = pixels[start:start + fixed_batch]
            caps = captions[start:start + fixed_batch] if captions is not None else None
            pad = fixed_batch - len(px)
            extra = {k: pad_to(v[start:start + fixed_batch], pad) for k, v in inputs.items()}
            px = pad_to(px, pad)
            if pad and caps is not None:
                caps = list(caps) + [""] * pad
            out = self._score(px, caps, extra)
            parts.append({k: v[:fixed_batch - pad] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _score(self, pixels: np.ndarray, captions: list[str] | None, inputs: dict[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
        from shardsmith.filters.pixels import to_tensor

        emb = self.embedder.embed_pixels(pixels)
        out: dict[str, np.ndarray] = {"embedding": emb}
        x = torch.from_numpy(emb).to(self.device)
        for name, head in self.heads.items():
            out[name] = head(x).float().cpu().numpy()
        for name, (pi, model) in self.pixel_heads.items():  # a second forward, on its own input
            out[name] = model(to_tensor(inputs[pi.column], pi).to(self.device)).float().cpu().numpy()
        if self.spec.similarity and captions is not None:
            txt = self.embedder.embed_texts([c or "" for c in captions])
            out["similarity"] = np.einsum("nd,nd->n", emb, txt).astype(np.float32)
        return out
