"""Heads on stored embeddings: scores computed from the fp16 embeddings a run kept
(``--embeddings``, clip-retrieval layout) instead of from a CLIP forward (``shardsmith recurate``).

In the full pipeline a head reads the fp32 L2-normalised embedding ``e``; a run stores
``fp16(e)``, and a head on the stored vector reads ``float32(fp16(e)) = e + d``. Rounding to
nearest fp16 moves each component by at most 2^-11 of its magnitude (normal range) or 2^-25
(subnormals, below 2^-14), so for a unit vector of D components

    ||d|| <= 2^-11 + sqrt(D) * 2^-25            (4.9e-4 for D = 768)

and a head with Lipschitz constant L moves by at most ``L * ||d||``. :func:`lipschitz_bound`
bounds L by the product of the spectral norms of the head's Linear layers (Dropout, Identity and
ReLU are 1-Lipschitz, a sigmoid output 1/4, the NSFW head's normalisation 1/sqrt(min var)):
:func:`fp16_bound` is that bound, the test's tolerance, recorded per head in the manifest.
The bound is loose for deep heads; what it measures on real data is in the README.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from shardsmith.filters.heads import NsfwHead, input_dim, load_head
from shardsmith.filters.scores import HeadSpec
from shardsmith.filters.weights import WeightsError

FP16_UNIT_ROUNDOFF = 2.0 ** -11
FP16_SUBNORMAL_STEP = 2.0 ** -25  # half the spacing of fp16 subnormals
_ONE_LIPSCHITZ = (nn.ReLU, nn.Dropout, nn.Identity, nn.Sequential)


def fp16_error_norm(dim: int) -> float:
    """The largest ||float32(fp16(e)) - e|| for a unit vector ``e`` of ``dim`` components."""
    return FP16_UNIT_ROUNDOFF + math.sqrt(dim) * FP16_SUBNORMAL_STEP


def lipschitz_bound(head: nn.Module) -> float:
    """An upper bound of the head's Lipschitz constant (L2); ``inf`` for a layer it cannot bound."""
    bound = 1.0
    for m in head.modules():
        if m is head and not isinstance(m, _ONE_LIPSCHITZ + (nn.Linear,)):
            continue  # the head class itself: its layers are counted below
        if isinstance(m, nn.Linear):
            bound *= float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
        elif not isinstance(m, _ONE_LIPSCHITZ):
            return math.inf
    if isinstance(head, NsfwHead):
        bound /= math.sqrt(float(torch.clamp(head.norm_var, min=head.eps).min()))
    if isinstance(head, NsfwHead) or getattr(head, "sigmoid", False):
        bound *= 0.25
    return bound


def fp16_bound(head: nn.Module) -> float:
    """How far the head's score on a stored fp16 embedding can be from its score on the fp32 one."""
    return lipschitz_bound(head) * fp16_error_norm(input_dim(head))


_CACHE: dict[tuple, nn.Module] = {}


def load_stored_head(name: str, spec: HeadSpec, embed_dim: int) -> nn.Module:
    """The head of ``spec`` for embeddings of ``embed_dim``, loaded once per process. Goes through
    ``filters.heads.load_head`` (the weights' checks, the width check against the run's model)."""
    key = (name, spec.arch, spec.weights, embed_dim)
    if key not in _CACHE:
        try:
            _CACHE[key] = load_head(name, spec.weights, embed_dim=embed_dim, arch=spec.arch)
        except WeightsError as e:
            raise WeightsError(f"head {name!r} ({spec.arch}): {e}") from e
    return _CACHE[key]


@torch.inference_mode()
def score_stored(head: nn.Module, embeddings: np.ndarray) -> np.ndarray:
    """The head's float32 scores of stored (fp16) embeddings (N, D), read as float32, not renormalised."""
    if len(embeddings) == 0:
        return np.zeros(0, np.float32)
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    return head(x).float().numpy()
