"""The generate/augment sink: what one output shard commits, through ``ShardCommit``.

    S.tar       KEY.png + KEY.txt (the caption: the prompt, or augment's source caption) + KEY.json
                (every parameter needed to make the image again) for each image made, in row order
    S.parquet   every row, img2dataset's columns: status success | error, with error_message and
                its kind in ``reason`` (``generation_error``; ``unsafe_content``: the safety checker
                flagged the image, which is not written)

Both at the top of OUTPUT, in img2dataset's layout, so ``shardsmith curate OUTPUT ...`` reads the
shards straight back (an error row there becomes an error row of kind ``generation_error``).
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from shardsmith.pipelines.core.commit import ShardCommit
from shardsmith.pipelines.core.ledger import shard_stats
from shardsmith.pipelines.formats.tar import TarWriter

INDEX_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()), ("prompt", pa.string()),
                          ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int64()),
                          ("height", pa.int64()), ("seed", pa.int64()), ("num_inference_steps", pa.int64()),
                          ("guidance_scale", pa.float64()), ("negative_prompt", pa.string()),
                          ("source_key", pa.string()), ("sha256", pa.string()), ("mode", pa.string()),
                          ("reason", pa.string()), ("nsfw_content_detected", pa.bool_())])


def index_row(r: dict) -> dict:
    p = json.loads(r["params"])
    return {"key": r["key"], "caption": r["caption"], "prompt": p.get("prompt"),
            "status": "success" if r["png"] is not None else "error", "error_message": r["error"],
            "width": p.get("width"), "height": p.get("height"), "seed": p.get("seed"),
            "num_inference_steps": p.get("num_inference_steps"), "guidance_scale": p.get("guidance_scale"),
            "negative_prompt": p.get("negative_prompt"), "source_key": p.get("source_key"),
            "sha256": hashlib.sha256(r["png"]).hexdigest() if r["png"] is not None else None,
            "mode": p.get("mode"), "reason": None if r["png"] is not None else error_kind(r),
            "nsfw_content_detected": p.get("nsfw_content_detected")}


def error_kind(r: dict) -> str:
    return r.get("error_kind") if isinstance(r.get("error_kind"), str) else "generation_error"


def write_generated_shard(name: str, rows: pa.Table | None, out_root: str, extra: dict | None = None) -> dict:
    """Write and commit one shard of made images (GENERATED rows, ``stages/diffuse.py``)."""
    commit = ShardCommit(out_root, name)
    recs = rows.sort_by("row").to_pylist() if rows is not None else []
    with commit.open(f"{name}.tar") as f, TarWriter(f) as tar:
        for r in recs:
            if r["png"] is None:
                continue
            meta = {**json.loads(r["params"]), "status": "success", "caption": r["caption"]}
            tar.add_sample(r["key"], {"png": r["png"], "txt": (r["caption"] or "").encode(),
                                      "json": json.dumps(meta, sort_keys=True).encode()})
    commit.parquet(f"{name}.parquet", pa.Table.from_pylist([index_row(r) for r in recs], schema=INDEX_SCHEMA))
    made = [r["png"] is not None for r in recs]
    stats = shard_stats(["kept" if m else "error" for m in made], [None if m else error_kind(r) for m, r in zip(made, recs)])
    nodes = sorted({r["node_id"] for r in recs if r.get("node_id")})
    return commit.commit(stats, generated=stats["kept"], node_ids=nodes, **(extra or {}))
