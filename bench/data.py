"""The benchmark's inputs, built deterministically and cached under ``bench/out/``.

- **Images**: img2dataset-style shards of realistic JPEGs (the sample-data textures: smooth colour
  fields, soft shapes, grain; every 6th with a tiled text watermark), sides drawn uniformly in
  256..1024 px, quality 90, captions like LAION's. No broken samples: the benchmark measures
  speed, the tests measure error handling.
- **Heads** for a 512-d CLIP (ViT-B-32): aesthetic MLP, watermark probability head, NSFW head, in
  their file formats, random (seeded) — built like ``jobs.tiny_models`` builds the tiny ones.
- **Metadata**: LAION-style parquet (``jobs.sample_data.write_metadata``) for metadata-only mode.
- **A small Stable Diffusion pipeline** big enough that generation is model-bound (a UNet of a few
  tens of millions of parameters at 128x128), built offline like the tiny one.

Same arguments, same bytes; a folder that already holds a complete build is reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np

CLIP_MODEL = "ViT-B-32"  # open_clip name; random weights (pretrained None): real architecture and FLOPs
EMBED_DIM = 512


def _done(path: str) -> bool:
    return os.path.exists(os.path.join(path, "_complete"))


def _mark_done(path: str, info: dict) -> None:
    with open(os.path.join(path, "_complete"), "w") as f:
        json.dump(info, f, indent=1)


def make_image_shards(out: str, shards: int, per_shard: int, lo: int = 256, hi: int = 1024, quality: int = 90,
                      seed: int = 0) -> dict:
    """``out/NNNNN.tar`` + ``NNNNN.parquet``; returns a description of the dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shardsmith.jobs.sample_data import add_watermark, caption_for, texture
    from shardsmith.pipelines.formats.tar import TarWriter

    info = {"dir": out, "shards": shards, "per_shard": per_shard, "images": shards * per_shard,
            "size_range_px": [lo, hi], "format": f"JPEG quality {quality}", "seed": seed}
    if _done(out):
        with open(os.path.join(out, "_complete")) as f:
            return json.load(f)
    os.makedirs(out, exist_ok=True)
    total_bytes = 0
    for s in range(shards):
        rng = np.random.default_rng([seed, 7, s])
        rows = []
        with open(os.path.join(out, f"{s:05d}.tar"), "wb") as f, TarWriter(f) as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
                img = texture(rng, w, h)
                if i % 6 == 1:
                    img = add_watermark(img, rng)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=quality)
                data = buf.getvalue()
                total_bytes += len(data)
                caption = caption_for(rng)
                meta = {"url": f"https://images.example.com/{key}.jpg", "key": key, "caption": caption,
                        "status": "success", "width": w, "height": h, "original_width": w, "original_height": h}
                tar.add_sample(key, {"jpg": data, "txt": caption.encode(), "json": json.dumps(meta).encode()})
                rows.append({"key": key, "url": meta["url"], "caption": caption, "status": "success",
                             "error_message": None, "width": w, "height": h, "original_width": w,
                             "original_height": h, "sha256": hashlib.sha256(data).hexdigest()})
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, f"{s:05d}.parquet"))
    info["mean_jpeg_bytes"] = round(total_bytes / max(1, shards * per_shard))
    _mark_done(out, info)
    return info


def shard_urls(info: dict, first: int = 0, count: int | None = None) -> str:
    """A comma-joined list of the dataset's tar paths (a subset: ``first`` .. ``first+count``)."""
    n = info["shards"] if count is None else count
    return ",".join(os.path.join(info["dir"], f"{s:05d}.tar") for s in range(first, first + n))


def iter_samples(info: dict, shards: int | None = None):
    """(jpeg bytes, caption) of the dataset's samples, in shard order (for the in-process loops)."""
    from shardsmith.pipelines.formats.tar import iter_tar_samples

    for s in range(info["shards"] if shards is None else shards):
        for sample in iter_tar_samples(os.path.join(info["dir"], f"{s:05d}.tar")):
            yield sample.image, sample.caption()


def make_heads(out: str, seed: int = 0) -> dict:
    """Random heads for 512-d embeddings, in the formats curate loads (paths by score name)."""
    import torch
    from safetensors.torch import save_file

    from shardsmith.filters.heads import AestheticMLP, NsfwHead, ProbabilityHead

    paths = {"aesthetic_head": os.path.join(out, "aesthetic.pth"),
             "watermark_head": os.path.join(out, "watermark.pth"),
             "nsfw_head": os.path.join(out, "nsfw.safetensors")}
    if _done(out):
        return paths
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(AestheticMLP(EMBED_DIM).state_dict(), paths["aesthetic_head"])
    torch.save(ProbabilityHead([EMBED_DIM, 1]).state_dict(), paths["watermark_head"])
    nsfw = NsfwHead(EMBED_DIM)
    save_file({k: v.contiguous() for k, v in nsfw.state_dict().items()}, paths["nsfw_head"])
    _mark_done(out, paths)
    return paths


def make_metadata(out: str, files: int, rows: int, seed: int = 0) -> dict:
    """LAION-5B-style metadata parquet (upper-case column names, as the original release), built
    with vectorised numpy/Arrow so that millions of rows take seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from shardsmith.jobs.sample_data import STYLES, SUBJECTS

    info = {"dir": out, "files": files, "rows_per_file": rows, "rows": files * rows,
            "paths": [os.path.join(out, f"part-{f:05d}.parquet") for f in range(files)]}
    if _done(out):
        return info
    os.makedirs(out, exist_ok=True)
    captions = pa.array([f"{style} of {subject}" for style in STYLES for subject in SUBJECTS])
    details = pa.array(["at dusk", "in winter", "high resolution", "free download", "wallpaper", "hd", "4k",
                        "vintage", "close up", "from above", "for sale", "stock image", "in the rain", "minimal"])
    for f, path in enumerate(info["paths"]):
        rng = np.random.default_rng([seed, 1000 + f])
        ids = np.arange(f * rows, (f + 1) * rows, dtype=np.int64)
        url = pc.binary_join_element_wise("https://images.example.com/m", pc.cast(pa.array(ids), pa.string()),
                                          ".jpg", "")
        t = pa.table({
            "SAMPLE_ID": ids,
            "URL": url,
            # near-unique like real alt texts: a subject phrase, a detail word and a number
            "TEXT": pc.binary_join_element_wise(captions.take(pa.array(rng.integers(0, len(captions), rows))),
                                                details.take(pa.array(rng.integers(0, len(details), rows))),
                                                pc.cast(pa.array(rng.integers(0, 10**6, rows)), pa.string()), " "),
            "WIDTH": rng.integers(64, 2048, rows).astype(np.int32),
            "HEIGHT": rng.integers(64, 2048, rows).astype(np.int32),
            "similarity": np.clip(rng.normal(0.31, 0.04, rows), -1, 1),
            "punsafe": rng.beta(0.5, 6, rows).astype(np.float32),
            "pwatermark": rng.beta(0.6, 2.0, rows).astype(np.float32),
            "AESTHETIC_SCORE": rng.normal(5.0, 0.8, rows).astype(np.float32),
        })
        pq.write_table(t, path)
    _mark_done(out, info)
    return info


def make_sd_pipeline(out: str, seed: int = 0) -> str:
    """An SD 1.x-style pipeline whose UNet dominates the cost (cross-attention UNet, 3 levels),
    with a tiny VAE and text encoder; random weights, saved with ``save_pretrained``."""
    if _done(out):
        return out
    from shardsmith.jobs.tiny_models import write_sd_pipeline

    pipe = write_sd_pipeline(
        out,
        unet=dict(block_out_channels=(64, 128, 192), layers_per_block=2, sample_size=16,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                  norm_num_groups=32, attention_head_dim=8),
        vae=dict(block_out_channels=[16, 32, 32, 32], norm_num_groups=8, sample_size=128),
        text=dict(hidden_size=64, intermediate_size=128), seed=seed)
    _mark_done(out, {"unet_params": sum(p.numel() for p in pipe.unet.parameters())})
    return out
