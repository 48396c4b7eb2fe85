"""``shardsmith tiny-models DIR``: small, randomly initialised models for offline runs and tests.

Writes
- ``DIR/clip/tiny-clip.json``: an open_clip model config (a 2-layer ViT at 64 px, a 2-layer text
  transformer, 64-d embeddings) and ``DIR/clip/tiny-clip.pt``, its random weights (seeded);
- ``DIR/heads/aesthetic.pth``: a LAION improved-aesthetic-predictor MLP in the original file
  format (a state dict with ``layers.0/2/4/6/7``), random, its output scaled to mean 5, sd 1 on
  synthetic images;
- ``DIR/heads/watermark.pth``: a watermark probability head *fit* on the tiny CLIP's embeddings
  of synthetic images with and without tiled text watermarks (``filters.fit.fit_probability_head``);
- ``DIR/heads/nsfw.safetensors``: the LAION NSFW detector architecture, random, biased low;
- ``DIR/sd-tiny/``: a tiny Stable Diffusion pipeline directory for diffusers (a 1 M-parameter
  UNet, a 4-level VAE with 8x downsampling, a 2-layer CLIP text encoder, DDIM), its CLIP tokenizer
  built from open_clip's bundled BPE vocabulary — nothing comes from a hub;
- with ``--generation``: the stand-ins of ``jobs/tiny_generation.py`` (inpainting model, ControlNet,
  LoRAs, textual-inversion embeddings, SDXL base + refiner, a safety checker that flags).

These models are untrained (apart from the watermark head's toy fit): their scores exercise the
pipeline, they mean nothing about real images.

    python -m shardsmith.jobs.tiny_models DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os

from shardsmith.jobs.entry import job_main
from shardsmith.jobs.tiny_sd import (  # noqa: F401  (re-exported: the tiny models' one import place)
    TINY_TEXT,
    TINY_UNET,
    TINY_VAE,
    clip_tokenizer,
    write_clip_tokenizer_files,
    write_sd_pipeline,
    write_tiny_sd,
)

TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


class _DropRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init():
    """open_clip logs "No pretrained weights loaded ... initialized randomly" on the root logger."""
    f = _DropRandomInit()
    logging.getLogger().addFilter(f)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)


def write_tiny_clip(out_dir: str, name: str = "tiny-clip", seed: int = 0) -> tuple[str, str]:
    import open_clip
    import torch

    os.makedirs(out_dir, exist_ok=True)
    cfg_path = os.path.join(out_dir, f"{name}.json")
    with open(cfg_path, "w") as f:
        json.dump(TINY_CLIP_CONFIG, f, indent=1)
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    with _quiet_random_init():  # random weights are what a tiny model is; open_clip warns about them
        model = open_clip.create_model(name, pretrained=None)
    weights = os.path.join(out_dir, f"{name}.pt")
    torch.save(model.state_dict(), weights)
    return cfg_path, weights


def calibration_set(n: int = 96, seed: int = 1):
    """Synthetic images (half watermarked) from the sample-data generator, with labels."""
    import numpy as np

    from shardsmith.jobs.sample_data import add_watermark, texture

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        img = texture(rng, int(rng.integers(96, 320)), int(rng.integers(96, 320)))
        wm = i % 2 == 1
        images.append(add_watermark(img, rng) if wm else img)
        labels.append(1.0 if wm else 0.0)
    return images, np.array(labels, dtype=np.float32)


def make_tiny_models(out: str, seed: int = 0) -> dict:
    import torch

    from shardsmith.filters.clip import ClipEmbedder, ClipSpec
    from shardsmith.filters.fit import fit_probability_head
    from shardsmith.filters.heads import AestheticMLP, NsfwHead

    cfg_path, weights = write_tiny_clip(os.path.join(out, "clip"), seed=seed)
    embedder = ClipEmbedder(ClipSpec(cfg_path, weights), device="cpu")
    images, labels = calibration_set()
    emb = embedder.embed_pil(images)
    x = torch.from_numpy(emb)
    heads_dir = os.path.join(out, "heads")
    os.makedirs(heads_dir, exist_ok=True)

    torch.manual_seed(seed + 1)
    aesthetic = AestheticMLP(emb.shape[1]).eval()
    with torch.no_grad():
        y = aesthetic(x)
        scale = 1.0 / float(y.std().clamp(min=1e-6))
        last = aesthetic.layers[7]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
        last.bias.add_(5.0 - float(aesthetic(x).mean()))
    aesthetic_path = os.path.join(heads_dir, "aesthetic.pth")
    torch.save(aesthetic.state_dict(), aesthetic_path)

    fit = fit_probability_head(emb, labels, seed=seed)
    watermark_path = os.path.join(heads_dir, "watermark.pth")
    torch.save(fit.head.state_dict(), watermark_path)

    torch.manual_seed(seed + 2)
    nsfw = NsfwHead(emb.shape[1]).eval()
    with torch.no_grad():
        nsfw.norm_mean.copy_(x.mean(0))
        nsfw.norm_var.copy_(x.var(0))
        logits = nsfw.layers(((x - nsfw.norm_mean) / nsfw.norm_var.sqrt()))
        nsfw.layers[6].bias.add_(-3.0 - float(logits.mean()))
    from safetensors.torch import save_file

    nsfw_path = os.path.join(heads_dir, "nsfw.safetensors")
    save_file({k: v.contiguous() for k, v in nsfw.state_dict().items()}, nsfw_path)

    sd_dir = write_tiny_sd(os.path.join(out, "sd-tiny"), seed=seed)

    info = {
        "sd_model": sd_dir,
        "clip_model": cfg_path,
        "clip_pretrained": weights,
        "aesthetic_head": aesthetic_path,
        "watermark_head": watermark_path,
        "nsfw_head": nsfw_path,
        "embed_dim": int(emb.shape[1]),
        "watermark_head_train_accuracy": round(fit.train_accuracy, 4),
        "note": "tiny random models for offline runs: their scores mean nothing about real images",
    }
    with open(os.path.join(out, "tiny-models.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def curate_flags(info: dict) -> list[str]:
    return ["--clip-model", info["clip_model"], "--clip-pretrained", info["clip_pretrained"],
            "--aesthetic-head", info["aesthetic_head"], "--watermark-head", info["watermark_head"],
            "--nsfw-head", info["nsfw_head"]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder to write the models into (local path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generation", action="store_true",
                   help="also write generation stand-ins: inpainting model, ControlNet, LoRAs, embeddings, SDXL base + "
                        "refiner, a safety checker that flags (DIR/tiny-generation.json)")


def run(args: argparse.Namespace) -> int:
    from shardsmith.errors import RunError

    try:
        info = make_tiny_models(args.dir, args.seed)
    except OSError as e:
        raise RunError(f"{args.dir}: cannot write the tiny models: {type(e).__name__}: {e}") from e
    print(f"wrote tiny models to {args.dir} (see {os.path.join(args.dir, 'tiny-models.json')})")
    if args.generation:
        from shardsmith.jobs.tiny_generation import make_generation_models

        make_generation_models(args.dir, args.seed, sd_dir=info["sd_model"])
        print(f"wrote generation stand-ins (see {os.path.join(args.dir, 'tiny-generation.json')})")
    print("use them with: shardsmith curate INPUT OUTPUT " + " ".join(curate_flags(info)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("shardsmith.jobs.tiny_models", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
