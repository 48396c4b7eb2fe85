"""The CLIP embedder: one open_clip image forward per sample feeds every head.

The model is named like open_clip names it (``ViT-L-14-quickgelu``), or given as a path to an
open_clip JSON model config (offline and tiny models); the weights are a pretrained tag
(``openai``), or a local or fsspec checkpoint path. Preprocessing is open_clip's own ``preprocess``
for the model, split in two exact halves: the PIL part (resize, crop, RGB) runs where images are
decoded and yields uint8 pixels, the tensor part (to float, normalise) runs batched next to the
model. Both halves together compute exactly what ``preprocess(image)`` computes.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from shardsmith.errors import ConfigError
from shardsmith.filters.weights import WeightsError, local_copy

DEFAULT_MODEL = "ViT-L-14-quickgelu"
DEFAULT_PRETRAINED = "openai"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def cpu_has_bf16() -> bool:
    """bf16 matrix units on this CPU (AVX512-BF16 or AMX-BF16), which oneDNN uses by itself."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def resolve_precision(requested: str, device: str) -> str:
    """The precision of the CLIP towers: ``auto`` is fp16 on CUDA, bf16 on a CPU with bf16
    units, fp32 elsewhere; an explicit one is kept."""
    if requested != "auto":
        return requested
    if str(device).startswith("cuda"):
        return "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


@dataclass(frozen=True)
class ClipSpec:
    """What to load: an open_clip model name or JSON config path, and weights tag or path."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED

    def resolve_name(self) -> str:
        """Register a JSON config path with open_clip and return the model name to create."""
        import open_clip

        if self.model.endswith(".json"):
            path = local_copy(self.model)
            open_clip.add_model_config(path)
            return os.path.splitext(os.path.basename(path))[0]
        if self.model not in open_clip.list_models() and ":" not in self.model:
            raise WeightsError(
                f"unknown open_clip model {self.model!r}: give a name from open_clip.list_models() "
                "or a path to an open_clip JSON model config"
            )
        return self.model

    def resolve_pretrained(self) -> str | None:
        """A pretrained tag stays a tag; a path (local or fsspec) becomes a local file."""
        p = self.pretrained
        if not p:
            return None
        if "://" in p or os.sep in p or p.endswith((".pt", ".pth", ".bin", ".safetensors")):
            return local_copy(p)  # a local path as is, a remote one cached once per node
        return p


def split_preprocess(preprocess) -> tuple[list, list]:
    """Split open_clip's Compose at its ToTensor step: (PIL transforms, tensor transforms)."""
    from torchvision.transforms import ToTensor

    steps = list(preprocess.transforms)
    for i, t in enumerate(steps):
        if isinstance(t, ToTensor):
            return steps[:i], steps[i + 1:]
    raise ValueError(f"open_clip preprocess has no ToTensor step: {preprocess}")


class PixelTransform:
    """The PIL half of the preprocess: PIL image in, uint8 HWC RGB array of the model's size out."""

    def __init__(self, pil_steps: list):
        self.steps = pil_steps

    def work_pixels(self, width: int, height: int) -> int:
        """The largest image (in pixels) the steps make from a ``width`` x ``height`` one: a
        shortest-side resize of a 1 x 65500 image to 224 makes 224 x 14.7 M pixels, so an extreme
        aspect ratio costs gigabytes however few pixels the file declares. Steps other than
        torchvision's Resize and CenterCrop are taken to keep the size."""
        from torchvision.transforms import CenterCrop, Resize

        w, h = max(1, width), max(1, height)
        most = w * h
        for t in self.steps:
            if isinstance(t, Resize):
                size = t.size
                if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1):
                    s = size if isinstance(size, int) else size[0]
                    short, long = min(w, h), max(w, h)
                    new_short, new_long = s, int(s * long / short)
                    if t.max_size and new_long > t.max_size:
                        new_short, new_long = int(t.max_size * new_short / new_long), t.max_size
                    w, h = (new_short, new_long) if w <= h else (new_long, new_short)
                else:
                    h, w = size
            elif isinstance(t, CenterCrop):
                ch, cw = t.size
                w, h = min(w, cw), min(h, ch)
            most = max(most, w * h)
        return most

    def __call__(self, img: Image.Image) -> np.ndarray:
        for t in self.steps:
            img = t(img)
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"preprocess gave an array of shape {arr.shape}, expected HxWx3")
        return arr


def compiled_tower(fn):
    """``fn`` through ``torch.compile`` (static shapes) with inductor's ``freezing``: the weights
    become constants of the graph, so the CPU's linear layers run on weights packed once for
    oneDNN instead of at every call. Measured on this project's CPU (open_clip ViT-B-32 bf16 image
    tower, batch 64, 2 threads): 1.14-1.21x eager with freezing, 0.98-1.06x without it. The
    setting is applied to this function's compiles only (a patch around each call), not to other
    compiles in the process (generate's UNet)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(fn, dynamic=False)

    def run(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return run


@contextmanager
def _on_device(device: torch.device):
    """Create the model directly on ``device`` when it is ``meta``: no memory, no random init,
    and a checkpoint's keys and shapes are still checked against the architecture (loading into
    meta parameters checks them and copies nothing). That is what a driver needs to validate a
    model and get its preprocessing: ~0.05 s instead of seconds (ViT-B/32) to a minute (ViT-L/14)."""
    if device.type != "meta":
        yield
        return
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        yield


class ClipEmbedder:
    """Loads one open_clip model and embeds images and captions, L2-normalised, in batches.

    ``precision``: the towers in fp32, or in open_clip's own mixed precision (``precision="bf16"``
    / ``"fp16"`` of ``create_model_and_transforms``, the OpenAI layout: linear, convolution and
    attention weights and the activations in the reduced type, every LayerNorm in fp32). On this
    project's CPU it ran the image tower 3.3-3.7x faster than fp32, ``torch.autocast`` 1.4-2.1x
    (autocast re-casts every weight at every forward; bench/precision.py). The embeddings come out in fp32, L2-normalised, so the heads and the
    similarity always run in fp32. ``compile``: the image tower through ``torch.compile`` (static
    shapes: forwards have a fixed batch size; frozen weights: ``compiled_tower``).
    ``device="meta"`` builds the model without weights in memory (see ``_on_device``): the
    preprocessing, sizes and tokenizer are real, the forwards are not.

    Captions are encoded on their own tokens, not on the 77 of the context (``embed_texts``): in a
    causal text tower the token open_clip pools sees only the tokens before it, so the padding
    after it changes nothing."""

    def __init__(self, spec: ClipSpec, device: str = "cpu", precision: str = "fp32", compile: bool = False):
        import open_clip

        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
        self.spec = spec
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, device)
        name = spec.resolve_name()
        pretrained = spec.resolve_pretrained()
        try:
            with _on_device(self.device):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, device=self.device, weights_only=True,
                    precision="fp32" if self.device.type == "meta" else self.precision,
                )
        except RuntimeError as e:
            raise WeightsError(f"cannot load CLIP {spec.model!r} with pretrained={spec.pretrained!r}: {e}") from e
        self.model = model.eval()
        self._encode_image = self.model.encode_image
        if compile and self.device.type != "meta":
            self._encode_image = compiled_tower(self.model.encode_image)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        pil_steps, tensor_steps = split_preprocess(preprocess)
        self.pixel_transform = PixelTransform(pil_steps)
        self.tensor_steps = tensor_steps
        self.input_dtype = getattr(torch, _DTYPES[self.precision]) if self.precision in _DTYPES else torch.float32
        self.text_prefix = _causal_text_tower(self.model)
        self._pad_tokens = self.tokenizer([""]).to(self.device)  # the rows that fill a short text forward
        self.text_rows = TEXT_ROWS_CUDA if self.device.type == "cuda" else TEXT_ROWS_CPU
        self.embed_dim = getattr(self.model.visual, "output_dim", None)
        if self.embed_dim is None:
            with torch.inference_mode():
                probe = torch.zeros(1, 3, *self.image_size, device=self.device, dtype=self.input_dtype)
                self.embed_dim = int(self.model.encode_image(probe).shape[-1])

    @property
    def image_size(self) -> tuple[int, int]:
        s = self.model.visual.image_size
        return (s, s) if isinstance(s, int) else tuple(s)

    def pixels_to_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W), exactly as ToTensor+Normalize."""
        x = torch.from_numpy(np.require(pixels, requirements=["C", "W"])).permute(0, 3, 1, 2).contiguous()
        x = x.to(dtype=torch.get_default_dtype()).div(255)
        for t in self.tensor_steps:
            x = t(x)
        return x

    @torch.inference_mode()
    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        x = self.pixels_to_tensor(pixels).to(self.device, dtype=self.input_dtype)
        feats = self._encode_image(x)
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Captions -> L2-normalised fp32 embeddings. On a causal text tower (open_clip's CLIP) each
        caption is encoded on its own tokens, rounded up to a multiple of TEXT_STEP, in forwards of
        a fixed ``text_rows`` captions (padded with empty ones): a caption's embedding then depends
        on its own length only, never on the other captions of the batch -- what lets a resumed
        run, whose batches hold other neighbours, stay byte-identical -- and equals open_clip's
        ``encode_text`` on the whole context (bit for bit here, tests/test_clip_text.py). Other
        text towers get the whole context in one forward."""
        tokens = self.tokenizer(texts).to(self.device)
        if self.text_prefix is None:
            feats = self.model.encode_text(tokens)
            return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()
        context = tokens.shape[1]
        lengths = self.text_prefix.lengths(tokens)
        buckets = torch.clamp((lengths + TEXT_STEP - 1) // TEXT_STEP * TEXT_STEP, max=context)
        out = torch.empty((len(texts), self.embed_dim), dtype=torch.float32, device=self.device)
        for length in buckets.unique().tolist():
            rows = (buckets == length).nonzero().flatten()
            for start in range(0, len(rows), self.text_rows):
                part = rows[start:start + self.text_rows]
                chunk = tokens[part]
                if len(part) < self.text_rows:
                    chunk = torch.cat([chunk, self._pad_tokens.expand(self.text_rows - len(part), -1)])
                out[part] = self.text_prefix(chunk, int(length))[:len(part)].float()
        return torch.nn.functional.normalize(out, dim=-1).cpu().numpy()

    def embed_pil(self, images: list[Image.Image]) -> np.ndarray:
        """Reference path: open_clip's preprocess on PIL images, then the image tower."""
        return self.embed_pixels(np.stack([self.pixel_transform(im) for im in images]))


TEXT_STEP = 16  # caption lengths are rounded up to this (a multiple of 16 kept bf16 results bit-identical here)
TEXT_ROWS_CPU = 8  # captions per text forward: few padding rows per length
TEXT_ROWS_CUDA = 64  # on a GPU a forward's launch cost outweighs the padding


class _TextPrefix:
    """open_clip ``CLIP.encode_text`` on the first ``length`` tokens of each row: the same
    modules in the same order, with the positional embedding and the causal mask cut to
    ``length``. Exact where every row's pooled token (its end-of-text) lies within ``length``."""

    def __init__(self, model):
        self.m = model

    def lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each row's tokens up to and including the one open_clip pools."""
        m = self.m
        if m.text_pool_type == "argmax":  # the end-of-text token has the highest id
            return tokens.argmax(dim=-1) + 1
        return (tokens == m.text_eos_id).int().argmax(dim=-1) + 1

    def __call__(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        m = self.m
        text = tokens[:, :length]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(text).to(cast_dtype)
        x = x + m.positional_embedding[:length].to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = text_global_pool(x, text, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return x


def _causal_text_tower(model) -> _TextPrefix | None:
    """A ``_TextPrefix`` for open_clip's own CLIP class with a causal text tower pooled at the
    end-of-text token; None for any other (HF text towers, bidirectional ones, other poolings,
    a subclass that changes ``encode_text``), which then see the whole context."""
    import open_clip

    ok = (type(model).encode_text is open_clip.model.CLIP.encode_text
          and getattr(model, "attn_mask", None) is not None
          and getattr(model, "text_pool_type", None) in ("argmax", "eos")
          and (model.text_pool_type == "argmax" or getattr(model, "text_eos_id", None) is not None))
    return _TextPrefix(model) if ok else None
