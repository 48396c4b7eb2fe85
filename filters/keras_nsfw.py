"""LAION's Keras NSFW detector -> a ``laion-nsfw`` state dict, without TensorFlow.

LAION-AI/CLIP-based-NSFW-Detector ships AutoKeras models as Keras SavedModel directories, zipped
(``clip_autokeras_binary_nsfw.zip`` for ViT-L/14, ``clip_autokeras_nsfw_b32.zip`` for ViT-B/32).
Their weights are the TensorFlow checkpoint under ``variables/`` (``filters/tensorbundle.py``
reads it). The model, in Keras layer order (checkpoint names ``layer_with_weights-N``):

    0  MultiCategoryEncoding  (AutoKeras: a StringLookup for the few input columns it took for
                               categorical; its vocabularies live in saved_model.pb, not here)
    1  Normalization          mean, variance, count
    2.. Dense                 kernel [in, out], bias [out], ReLU between, sigmoid at the end

The conversion keeps the normalisation and the Dense layers (kernels transposed to torch's
[out, in]) and feeds every column numerically, the categorical ones included: that is what the
PyTorch ports do too, and how far it moves the output is measured (README, Predictors).
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile

import numpy as np

from shardsmith.errors import ConfigError
from shardsmith.filters.tensorbundle import TensorBundle

_LAYER = re.compile(r"^layer_with_weights-(\d+)/(.+)/\.ATTRIBUTES/VARIABLE_VALUE$")
_CATEGORICAL = re.compile(r"^layer_with_weights-\d+/encoding_layers/(\d+)/")


class KerasConversionError(ConfigError):
    """The SavedModel is not the NSFW detector's shape; the message says what was found."""


def find_checkpoint(root: str) -> str:
    """The checkpoint prefix (``.../variables/variables``) inside an unpacked SavedModel."""
    hits = []
    for d, _, files in os.walk(root):
        if "variables.index" in files:
            hits.append(os.path.join(d, "variables"))
    if len(hits) != 1:
        raise KerasConversionError(f"{root}: expected one Keras SavedModel (variables/variables.index), found "
                                   f"{len(hits)}")
    return hits[0]


def unpack_zip(path: str, dest: str) -> str:
    """Extract a zip into ``dest``, refusing members that climb out of it."""
    with zipfile.ZipFile(path) as z:
        for m in z.infolist():
            name = m.filename
            if name.startswith("/") or ".." in name.replace("\\", "/").split("/"):
                raise KerasConversionError(f"{path}: member {name!r} would be written outside the folder")
        z.extractall(dest)
    return dest


def read_keras_nsfw(prefix: str) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict of numpy arrays in the ``laion-nsfw`` layout, what was found) from a checkpoint."""
    bundle = TensorBundle(prefix)
    layers: dict[int, dict[str, np.ndarray]] = {}
    categorical = set()
    for name in bundle.names():
        m = _LAYER.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = bundle[name]
        c = _CATEGORICAL.match(name)
        if c:
            categorical.add(int(c.group(1)))
    norm = [i for i, v in layers.items() if {"mean", "variance"} <= set(v)]
    dense = sorted(i for i, v in layers.items() if {"kernel", "bias"} <= set(v))
    if len(norm) != 1 or not dense or any(i < norm[0] for i in dense):
        raise KerasConversionError(
            f"{prefix}: not LAION's NSFW detector: expected one Normalization layer (mean, variance) followed by "
            f"Dense layers (kernel, bias); found layers {sorted(layers)} with "
            + "; ".join(f"{i}: {', '.join(sorted(v))}" for i, v in sorted(layers.items())))
    mean = layers[norm[0]]["mean"].reshape(-1).astype(np.float32)
    var = layers[norm[0]]["variance"].reshape(-1).astype(np.float32)
    sd = {"norm_mean": mean, "norm_var": var}
    width = mean.shape[0]
    for j, i in enumerate(dense):
        kernel, bias = layers[i]["kernel"], layers[i]["bias"]
        if kernel.ndim != 2 or kernel.shape[0] != width or bias.shape != (kernel.shape[1],):
            raise KerasConversionError(f"{prefix}: Dense layer_with_weights-{i} has kernel {list(kernel.shape)} and "
                                       f"bias {list(bias.shape)}; expected [{width}, N] and [N]")
        sd[f"layers.{2 * j}.weight"] = np.ascontiguousarray(kernel.T.astype(np.float32))
        sd[f"layers.{2 * j}.bias"] = bias.astype(np.float32)
        width = kernel.shape[1]
    if width != 1:
        raise KerasConversionError(f"{prefix}: the last Dense layer has {width} outputs, expected 1 (a sigmoid score)")
    info = {"input_size": int(mean.shape[0]),
            "layers": [int(sd[f"layers.{2 * j}.weight"].shape[0]) for j in range(len(dense))],
            "categorical_columns": sorted(categorical),
            "normalization_count": int(np.asarray(layers[norm[0]].get("count", -1)).reshape(-1)[0])}
    return sd, info


def convert_keras_nsfw(src: str, out: str) -> dict:
    """Convert LAION's Keras NSFW detector at ``src`` (the zip as published, or the unpacked
    SavedModel folder) into a ``laion-nsfw`` safetensors file ``out``; returns what was found."""
    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        root = src
        if os.path.isfile(src):
            if not zipfile.is_zipfile(src):
                raise KerasConversionError(f"{src}: neither a zip nor a SavedModel folder")
            root = unpack_zip(src, tmp)
        sd, info = read_keras_nsfw(find_checkpoint(root))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp_out = f"{out}.tmp-{os.getpid()}"
    save_file(tensors, tmp_out, metadata={
        "converted_from": "keras-savedmodel", "categorical_columns": ",".join(map(str, info["categorical_columns"])),
        "note": "categorical columns are fed numerically"})
    os.replace(tmp_out, out)
    return info
