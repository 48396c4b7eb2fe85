"""How far feeding AutoKeras' categorical columns numerically moves LAION's NSFW detector.

LAION's Keras model maps a few input columns through StringLookup tables (the column's value as a
``"%f"`` string -> its index in the training vocabulary; unknown -> 0) before Normalization. The
conversion (``filters/keras_nsfw.py``) feeds those columns as numbers. This script reimplements the
lookup exactly, with the vocabularies read from the SavedModel's ``saved_model.pb`` (graph
constants, in the encoding layers' order), and compares both on the embeddings given: as float32,
rounded to float16 (clip-retrieval's stored embeddings), and pushed to mid-range punsafe along the
numeric model's gradient (unit norm kept; cosine to the start ~0.996), where a logit change matters
most. Needs the real files (not in the repository):

    python -m bench.nsfw_keras_categorical clip_autokeras_binary_nsfw.zip vit_l_14_embeddings/rating*.npy
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
import torch


def vocabularies(pb: bytes) -> list[dict[str, int]]:
    """The string -> index tables of the graph's constants, in creation order."""
    from shardsmith.filters.tensorbundle import proto_fields

    meta_graph = next(v for f, _, v in proto_fields(pb) if f == 2)
    graph = next(v for f, _, v in proto_fields(meta_graph) if f == 2)
    consts = {}
    for f, _, node in proto_fields(graph):
        if f != 1:
            continue
        fields = proto_fields(node)
        name = next((v for a, _, v in fields if a == 1), b"").decode()
        if next((v for a, _, v in fields if a == 2), b"") != b"Const":
            continue
        for a, _, attr in fields:
            entry = proto_fields(attr) if a == 5 else []
            if not entry or next(x for ff, _, x in entry if ff == 1) != b"value":
                continue
            tensor = proto_fields(next(x for ff, _, x in proto_fields(next(x for ff, _, x in entry if ff == 2))
                                       if ff == 8))
            dtype = next((x for ff, _, x in tensor if ff == 1), 0)
            if dtype == 7:
                strings = [x for ff, _, x in tensor if ff == 8]
                if len(strings) > 100:
                    consts[name] = [s.decode() for s in strings]
            elif dtype == 9:
                raw = next((x for ff, _, x in tensor if ff == 4), b"")
                if len(raw) > 800:
                    consts[name] = np.frombuffer(raw, "<i8")
    names = sorted(consts, key=lambda n: int(n.split("_")[1]) if "_" in n else 0)
    out = []
    for i, n in enumerate(names):
        if isinstance(consts[n], list):
            out.append(dict(zip(consts[n], consts[names[i + 1]].tolist())))
    return out


def main(argv: list[str]) -> dict:
    from shardsmith.filters.heads import NsfwHead
    from shardsmith.filters.keras_nsfw import find_checkpoint, read_keras_nsfw, unpack_zip

    src, embs = argv[0], argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack_zip(src, tmp) if os.path.isfile(src) else src
        prefix = find_checkpoint(root)
        sd, info = read_keras_nsfw(prefix)
        pb = open(os.path.join(os.path.dirname(os.path.dirname(prefix)), "saved_model.pb"), "rb").read()
    tables = dict(zip(info["categorical_columns"], vocabularies(pb)))
    head = NsfwHead.from_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}).eval()
    e = np.concatenate([np.load(p).reshape(-1, info["input_size"]) for p in embs]).astype(np.float32)

    def categorical(x):
        y, hits = x.astype(np.float64).copy(), 0
        for c, table in tables.items():
            for r in range(len(x)):
                s = "%f" % float(np.float32(x[r, c]))
                hits += s in table
                y[r, c] = float(table.get(s, 0))
        return y.astype(np.float32), hits

    def logits(x):
        with torch.no_grad():
            return head.layers(head.normalize(torch.from_numpy(x))).squeeze(-1).numpy()

    def mid_range(x0):
        out = []
        for r in range(len(x0)):
            x = torch.from_numpy(x0[r:r + 1].copy()).requires_grad_(True)
            for _ in range(2000):
                p = float(head(x.detach()))
                if 0.4 <= p <= 0.6:
                    break
                (g,) = torch.autograd.grad(head.layers(head.normalize(x)).sum(), x)
                with torch.no_grad():
                    x += (0.002 if p < 0.4 else -0.002) * g / (g.norm() + 1e-12)
                    x /= x.norm()
            out.append(x.detach().numpy())
        return np.concatenate(out)

    result = {"model": os.path.basename(src), "categorical_columns": info["categorical_columns"],
              "vocabulary_sizes": [len(t) for t in tables.values()], "embeddings": len(e)}
    for label, x in (("float32", e), ("float16", e.astype(np.float16).astype(np.float32)),
                     ("float16_mid_range", mid_range(e).astype(np.float16).astype(np.float32))):
        xc, hits = categorical(x)
        sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
        a, b = logits(x), logits(xc)
        result[label] = {"in_vocabulary": f"{hits}/{len(x) * len(tables)}",
                         "max_abs_logit_diff": float(np.abs(a - b).max()),
                         "max_abs_prob_diff": float(np.abs(sig(a) - sig(b)).max()),
                         "numeric_punsafe": [round(float(v), 5) for v in sig(a)]}
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
