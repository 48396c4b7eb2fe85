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
