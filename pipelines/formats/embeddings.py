"""clip-retrieval's embeddings layout, which autofaiss, clip-retrieval and shardsmith's own dedup,
recurate and fit-head read:

    OUTPUT/img_emb/img_emb_S.npy            fp16 (N, D), L2-normalised image embeddings of shard S
    OUTPUT/metadata/metadata_S.parquet      row-aligned with it: key, url, caption, status, scores

Only the rows that have an embedding are there (not the error rows). Written by curate with
``--embeddings`` (``sinks/curated.py``); read here, through fsspec, one shard at a time.
"""

from __future__ import annotations

import io
from typing import Iterator

EMB_DIR = "img_emb"
META_DIR = "metadata"
PARTS = (EMB_DIR, META_DIR)


def embeddings_file(shard: str) -> str:
    return f"{EMB_DIR}/img_emb_{shard}.npy"


def metadata_file(shard: str) -> str:
    return f"{META_DIR}/metadata_{shard}.parquet"


def embedding_shards(output: str) -> list[str]:
    """The shards of OUTPUT that have embeddings, in name order."""
    from shardsmith.pipelines.core import fs as fsutil

    d = fsutil.join(output, EMB_DIR)
    if not fsutil.exists(d):
        return []
    names = [u.rstrip("/").rsplit("/", 1)[-1] for u in fsutil.list_files(d, (".npy",))]
    return sorted(n[len("img_emb_"):-len(".npy")] for n in names if n.startswith("img_emb_"))


def read_embeddings(output: str, shard: str):
    """(metadata table, fp16 embeddings (N, D)) of one shard; the two are row-aligned."""
    import numpy as np
    import pyarrow.parquet as pq

    from shardsmith.pipelines.core import fs as fsutil

    emb = np.load(io.BytesIO(fsutil.read_bytes(fsutil.join(output, embeddings_file(shard)))), allow_pickle=False)
    with fsutil.open_file(fsutil.join(output, metadata_file(shard))) as f:
        meta = pq.read_table(f, use_threads=False)
    if meta.num_rows != len(emb):
        raise ValueError(f"{output}: {metadata_file(shard)} has {meta.num_rows} rows but "
                         f"{embeddings_file(shard)} has {len(emb)}: the embeddings output is damaged")
    return meta, emb


def iter_embeddings(output: str, shards: list[str] | None = None) -> Iterator[tuple[str, object, object]]:
    """(shard, metadata table, embeddings) for each shard (default: every shard with embeddings)."""
    for shard in shards if shards is not None else embedding_shards(output):
        meta, emb = read_embeddings(output, shard)
        yield shard, meta, emb


def _npy_header(f):
    import numpy as np

    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran or len(shape) != 2:
        raise ValueError(f"expected a C-order 2-D array, got shape {shape} (fortran order: {fortran})")
    return shape, dtype


def embedding_shape(output: str, shard: str) -> tuple[int, int]:
    """(rows, dimension) of one shard's embeddings, from the .npy header alone."""
    from shardsmith.pipelines.core import fs as fsutil

    with fsutil.open_file(fsutil.join(output, embeddings_file(shard))) as f:
        shape, _ = _npy_header(f)
    return int(shape[0]), int(shape[1])


def read_embedding_prefix(output: str, shard: str, count: int):
    """The first ``count`` rows of one shard's embeddings (fp16 or as stored), reading only those
    bytes: a sample for k-means without reading the whole file (a ranged read on object storage)."""
    import numpy as np

    from shardsmith.pipelines.core import fs as fsutil

    with fsutil.open_file(fsutil.join(output, embeddings_file(shard))) as f:
        shape, dtype = _npy_header(f)
        count = max(0, min(int(count), int(shape[0])))
        data = f.read(count * int(shape[1]) * dtype.itemsize)
    return np.frombuffer(data, dtype=dtype).reshape(count, int(shape[1]))
