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


def write_clip_tokenizer_files(out_dir: str) -> tuple[str, str]:
    """vocab.json + merges.txt of the CLIP BPE tokenizer, from open_clip's bundled vocabulary.

    Same token ids as OpenAI's CLIP tokenizer (open_clip builds its vocabulary the same way);
    transformers' CLIPTokenizer reads these two files."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    vocab_path, merges_path = os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")
    with open(vocab_path, "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def clip_tokenizer():
    """transformers' CLIPTokenizer from open_clip's bundled BPE (nothing from a hub)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = write_clip_tokenizer_files(tmp)
        return CLIPTokenizer(vocab, merges, model_max_length=77)


def write_sd_pipeline(out_dir: str, unet: dict, vae: dict, text: dict, seed: int = 0, in_channels: int = 4):
    """An SD 1.x-style diffusers pipeline with random weights, of the sizes given for its UNet, VAE
    and text encoder (DDIM scheduler, open_clip's BPE as the tokenizer), saved with
    save_pretrained; returns the pipeline. ``in_channels=9``: a dedicated inpainting model
    (latents + mask + masked-image latents), saved as a ``StableDiffusionInpaintPipeline``."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    unet_model = UNet2DConditionModel(in_channels=in_channels, out_channels=4, **unet)
    vae_model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                              **vae)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, layer_norm_eps=1e-5, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77, **text))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    pipe = cls(vae=vae_model, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet_model,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" of one tiny file says nothing
    try:
        pipe.save_pretrained(out_dir)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return pipe


TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
                 attention_head_dim=8)
TINY_VAE = dict(block_out_channels=[8, 16, 16, 16], norm_num_groups=4, sample_size=256)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37)


def write_tiny_sd(out_dir: str, seed: int = 0, in_channels: int = 4) -> str:
    """A tiny SD 1.x-style diffusers pipeline, saved with save_pretrained (``in_channels=9``: a
    dedicated inpainting model)."""
    write_sd_pipeline(out_dir, unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT, seed=seed, in_channels=in_channels)
    return out_dir


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
