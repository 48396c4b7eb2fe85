"""The tiny Stable Diffusion stand-ins (a CLIP tokenizer from a handful of tokens, a diffusers
pipeline of random tiny components), shared by ``tiny_models`` (curate's and generate's models)
and ``tiny_generation`` (the inpainting model, ControlNet and adapters)."""

from __future__ import annotations

import json
import os


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
