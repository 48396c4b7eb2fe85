"""clip-retrieval's embeddings layout, which autofaiss, clip-retrieval and shardsmith's own dedup
and recurate read:

    OUTPUT/img_emb/img_emb_S.npy            fp16 (N, D), L2-normalised image embeddings of shard S
    OUTPUT/metadata/metadata_S.parquet      row-aligned with it: key, url, caption, status, scores

Only the rows that have an embedding are there (not the error rows).
"""

from __future__ import annotations

EMB_DIR = "img_emb"
META_DIR = "metadata"
PARTS = (EMB_DIR, META_DIR)


def embeddings_file(shard: str) -> str:
    return f"{EMB_DIR}/img_emb_{shard}.npy"


def metadata_file(shard: str) -> str:
    return f"{META_DIR}/metadata_{shard}.parquet"
