"""The in-process reference loops curate is compared with, each at full strength: torch's own
thread count (every core of the node, what a plain Python process gets), the same model, heads,
batch size and precision as the curate run it is compared with. Reduced precision is open_clip's
own (``create_model_and_transforms(..., precision="bf16")``), the fastest a user gets from
open_clip; captions go through ``encode_text`` on open_clip's whole 77-token context, as a user
calls it (curate encodes each caption on its own tokens: ``text="own"`` measures that too).

- ``BareModels``: the model work of curate and nothing else, on already-decoded, preprocessed
  float tensors and already-tokenized captions: the CLIP image and text towers (``towers_only``:
  the ceiling of a node, ``node_efficiency``), or the towers, the three heads and the similarity
  (``scoring_efficiency``).
- ``SinglePurposeTools``: the way one-score-per-tool pipelines compute the same four scores: each
  tool opens, decodes and preprocesses the image itself and runs its own image forward; the
  similarity tool also encodes the caption. Four image forwards and four decodes per image,
  where curate does one of each.

All are timed in the benchmark's own process, alternating with the curate runs they are compared
with (so the noise of a shared machine hits both sides alike).
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from PIL import Image

from shardsmith.filters.clip import ClipEmbedder, ClipSpec
from shardsmith.filters.heads import load_head

HEAD_FILES = {"aesthetic": "aesthetic_head", "pwatermark": "watermark_head", "punsafe": "nsfw_head"}


class Models:
    """One CLIP model (at every precision asked for, the same weights), its preprocess and
    tokenizer, and the three heads (shared by the loops)."""

    def __init__(self, clip_model: str, heads: dict[str, str]):
        self.clip_model = clip_model
        self.embedder = ClipEmbedder(ClipSpec(clip_model, None), device="cpu")
        self.model = self.embedder.model
        self._at = {"fp32": self.embedder}
        self.heads = {name: load_head(name, heads[key], embed_dim=self.embedder.embed_dim)
                      for name, key in HEAD_FILES.items()}

    def at(self, precision: str) -> ClipEmbedder:
        """The embedder at ``precision`` (open_clip's own mixed precision), with the fp32 weights."""
        if precision not in self._at:
            e = ClipEmbedder(ClipSpec(self.clip_model, None), device="cpu", precision=precision)
            e.model.load_state_dict(self.model.state_dict())
            self._at[precision] = e
        return self._at[precision]


class BareModels:
    """The towers (+ heads + similarity) on ready tensors, ``batch`` rows per forward."""

    def __init__(self, models: Models, jpegs: list[bytes], captions: list[str], batch: int):
        e = models.embedder
        self.models = models
        self.batch = batch
        n = len(jpegs) - len(jpegs) % batch or len(jpegs)
        pixels = np.stack([e.pixel_transform(Image.open(io.BytesIO(d))) for d in jpegs[:n]])
        self.images = e.pixels_to_tensor(pixels)  # normalised float (N, 3, H, W): decoding is not timed
        self.captions = captions[:n]
        self.tokens = e.tokenizer(self.captions)  # token ids (N, 77): tokenizing is not timed

    @torch.inference_mode()
    def run(self, batches: int, precision: str = "fp32", towers_only: bool = False,
            text: str = "context") -> tuple[int, float]:
        """Run ``batches`` forwards (cycling over the data); returns (images, seconds).
        ``text="context"``: ``encode_text`` on the 77-token context; ``"own"``: each caption on
        its own tokens, as curate does (``ClipEmbedder.embed_texts``, tokenizing included)."""
        m = self.models
        e = m.at(precision)
        n_avail = len(self.images) // self.batch
        images = self.images.to(e.input_dtype)
        t0 = time.perf_counter()
        for b in range(batches):
            s = (b % n_avail) * self.batch
            img = e.model.encode_image(images[s:s + self.batch])
            if text == "own":
                txt = torch.from_numpy(e.embed_texts(self.captions[s:s + self.batch]))
            else:
                txt = e.model.encode_text(self.tokens[s:s + self.batch])
            if towers_only:
                continue
            img = torch.nn.functional.normalize(img.float(), dim=-1)
            txt = torch.nn.functional.normalize(txt.float(), dim=-1)
            for head in m.heads.values():
                head(img)
            (img * txt).sum(-1)
        return batches * self.batch, time.perf_counter() - t0


class SinglePurposeTools:
    """Four tools, each with its own decode + preprocess + image forward per image (batched like
    curate); the similarity tool also tokenizes and encodes the caption."""

    def __init__(self, models: Models, jpegs: list[bytes], captions: list[str], batch: int):
        self.models = models
        self.jpegs = jpegs
        self.captions = captions
        self.batch = batch

    def _images(self, chunk: list[bytes]) -> torch.Tensor:
        pre = self.models.embedder.preprocess  # open_clip's own preprocess, as a standalone tool uses it
        return torch.stack([pre(Image.open(io.BytesIO(d))) for d in chunk])

    @torch.inference_mode()
    def run(self, batches: int, precision: str = "fp32") -> tuple[int, float]:
        m = self.models
        e = m.at(precision)
        n_avail = max(1, len(self.jpegs) // self.batch)
        t0 = time.perf_counter()
        for b in range(batches):
            s = (b % n_avail) * self.batch
            chunk, caps = self.jpegs[s:s + self.batch], self.captions[s:s + self.batch]
            for name in ("aesthetic", "pwatermark", "punsafe"):  # one tool per score
                emb = e.model.encode_image(self._images(chunk).to(e.input_dtype))
                m.heads[name](torch.nn.functional.normalize(emb.float(), dim=-1))
            img = e.model.encode_image(self._images(chunk).to(e.input_dtype))
            txt = e.model.encode_text(e.tokenizer(caps))
            (torch.nn.functional.normalize(img.float(), dim=-1) * torch.nn.functional.normalize(txt.float(), dim=-1)).sum(-1)
        return batches * self.batch, time.perf_counter() - t0
