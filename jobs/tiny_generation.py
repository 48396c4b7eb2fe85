"""Tiny, randomly initialised generation components beyond a plain SD pipeline, built offline and
seeded (``shardsmith tiny-models DIR --generation`` writes them all): the stand-ins that tests and
offline runs use for a dedicated inpainting model, a ControlNet, LoRAs, textual-inversion
embeddings, an SDXL base + refiner pair and a safety checker that flags images.

Sizes follow diffusers' own ``get_dummy_components`` in its test suite; the tokenizers are
open_clip's bundled BPE (``tiny_models.clip_tokenizer``): nothing comes from a hub. These models
are untrained: they exercise the code paths, their images mean nothing.
"""

from __future__ import annotations

import json
import os

from shardsmith.jobs.tiny_sd import TINY_TEXT, clip_tokenizer, write_tiny_sd

LORA_TARGETS_UNET = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_TARGETS_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _randomize_(modules, seed: int, std: float = 0.2) -> None:
    """Give zero-initialised layers (ControlNet's zero convs) seeded random weights, so that the
    component changes the image (a zero ControlNet would pass every pixel test by doing nothing)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def write_tiny_controlnet(out_dir: str, sd_dir: str, seed: int = 0) -> str:
    """A ControlNet for the tiny SD pipeline at ``sd_dir`` (its encoder copied from the UNet,
    diffusers' ``ControlNetModel.from_unet``), zero convs made random; saved with save_pretrained."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(sd_dir, "unet"))
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    _randomize_([*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out], seed)
    cn.save_pretrained(out_dir)
    return out_dir


def write_tiny_lora(path: str, sd_dir: str, seed: int = 0, rank: int = 4, text_encoder: bool = True,
                    unet_cls=None) -> str:
    """A LoRA for the pipeline at ``sd_dir`` made with peft (UNet attention projections, and the
    text encoder's when ``text_encoder``), random non-zero B matrices, saved as one
    ``.safetensors`` file the way diffusers' training scripts save theirs (``save_lora_weights``)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = (unet_cls or UNet2DConditionModel).from_pretrained(os.path.join(sd_dir, "unet"))
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS_UNET, init_lora_weights=False))
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
    if text_encoder:
        from transformers import CLIPTextModel

        te = CLIPTextModel.from_pretrained(os.path.join(sd_dir, "text_encoder"))
        te.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS_TEXT, init_lora_weights=False))
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(te))
    folder, name = os.path.split(os.path.abspath(path))
    StableDiffusionPipeline.save_lora_weights(folder, weight_name=name, safe_serialization=True, **layers)
    return path


def write_tiny_textual_inversion(path: str, token: str, dim: int = TINY_TEXT["hidden_size"], vectors: int = 1,
                                 seed: int = 0) -> str:
    """A textual-inversion embedding in diffusers' format: one ``{token: tensor}`` safetensors file
    (``vectors`` > 1: a multi-vector embedding)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    emb = torch.randn((vectors, dim) if vectors > 1 else (dim,), generator=g)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({token: emb.contiguous()}, path)
    return path


def _sdxl_unet(cross_attention_dim: int, time_ids: int, pooled: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=time_ids * 8 + pooled, cross_attention_dim=cross_attention_dim,
        norm_num_groups=8)


def _sdxl_text_encoders(seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32,
                         intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
    torch.manual_seed(seed + 1)
    te = CLIPTextModel(cfg)
    torch.manual_seed(seed + 2)
    te2 = CLIPTextModelWithProjection(cfg)
    return te, te2


def _sdxl_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16, 16, 16],
                         down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         norm_num_groups=4, sample_size=256)


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                                  timestep_spacing="leading")


def write_tiny_sdxl(out_dir: str, seed: int = 0) -> str:
    """A tiny SDXL base pipeline (two text encoders, text_time conditioning), saved with save_pretrained."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    unet = _sdxl_unet(cross_attention_dim=64, time_ids=6, pooled=32)
    vae = _sdxl_vae()
    te, te2 = _sdxl_text_encoders(seed)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer(), unet=unet, scheduler=_sdxl_scheduler(),
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(out_dir)
    return out_dir


def write_tiny_sdxl_refiner(out_dir: str, base_dir: str, seed: int = 0) -> str:
    """A tiny SDXL refiner for the base at ``base_dir``: its second text encoder and VAE (which the
    refiner shares with the base at run time), its own UNet with aesthetic-score conditioning."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed + 10)
    unet = _sdxl_unet(cross_attention_dim=32, time_ids=5, pooled=32)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=AutoencoderKL.from_pretrained(os.path.join(base_dir, "vae")), text_encoder=None,
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(os.path.join(base_dir, "text_encoder_2")),
        tokenizer=None, tokenizer_2=clip_tokenizer(), unet=unet, scheduler=_sdxl_scheduler(),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(out_dir)
    return out_dir


CALIBRATION_PROMPTS = ["a red bicycle", "a mountain lake", "a lighthouse", "a bowl of fruit", "a city at night",
                       "a field of flowers", "a sleeping cat", "a wooden boat", "a snowy cabin", "a desert road",
                       "an old castle", "a green apple", "a rainy street", "a blue door", "a tall tree", "a beach"]


def safety_cosines(checker, feature_extractor, images) -> list[float]:
    """The cosine of each image's checker embedding with the first concept (what the checker
    thresholds), exactly as ``StableDiffusionSafetyChecker.forward`` computes it."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    with torch.no_grad():
        x = feature_extractor(images, return_tensors="pt").pixel_values
        emb = checker.visual_projection(checker.vision_model(x)[1])
        return [float(v) for v in cosine_distance(emb, checker.concept_embeds)[:, 0]]


def write_with_safety_checker(out_dir: str, sd_dir: str, seed: int = 0, flag_fraction: float = 0.5,
                              size: int = 64, steps: int = 2) -> dict:
    """The pipeline at ``sd_dir`` with a tiny random ``StableDiffusionSafetyChecker`` (and its
    CLIPImageProcessor) that flags about ``flag_fraction`` of images: its first concept's
    threshold is set between the checker's cosines of images the pipeline makes for
    ``CALIBRATION_PROMPTS`` (seeds 0..15, ``size`` px, ``steps`` steps); the other concepts never fire."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    images = [pipe(p, num_inference_steps=steps, width=size, height=size,
                   generator=torch.Generator("cpu").manual_seed(i)).images[0]
              for i, p in enumerate(CALIBRATION_PROMPTS)]
    torch.manual_seed(seed + 20)
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                                  "num_hidden_layers": 2, "vocab_size": 1000},
                     vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                                    "num_hidden_layers": 2, "image_size": 32, "patch_size": 4},
                     projection_dim=16)
    checker = StableDiffusionSafetyChecker(cfg).eval()
    fe = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 21)
        checker.concept_embeds.copy_(torch.randn(checker.concept_embeds.shape, generator=g))
        checker.special_care_embeds.copy_(torch.randn(checker.special_care_embeds.shape, generator=g))
        cos = np.array(safety_cosines(checker, fe, images))
        threshold = float(np.quantile(cos, 1 - flag_fraction))
        checker.concept_embeds_weights.fill_(2.0)  # cosines are <= 1: never
        checker.concept_embeds_weights[0] = threshold
        checker.special_care_embeds_weights.fill_(2.0)
    out = StableDiffusionPipeline(**{**pipe.components, "safety_checker": checker, "feature_extractor": fe},
                                  requires_safety_checker=True)
    out.save_pretrained(out_dir)
    return {"dir": out_dir, "threshold": threshold, "calibration_flagged": int((cos - threshold > 0).sum())}


def make_generation_models(out: str, seed: int = 0, sd_dir: str | None = None) -> dict:
    """Every generation stand-in under ``out`` (the plain tiny SD pipeline too, unless ``sd_dir``
    names one); returns their paths (also written to ``out/tiny-generation.json``)."""
    sd = sd_dir or write_tiny_sd(os.path.join(out, "sd-tiny"), seed=seed)
    info = {
        "sd_model": sd,
        "inpaint_model": write_tiny_sd(os.path.join(out, "sd-tiny-inpaint"), seed=seed + 1, in_channels=9),
        "controlnet": write_tiny_controlnet(os.path.join(out, "controlnet-tiny"), sd, seed=seed + 2),
        "lora": write_tiny_lora(os.path.join(out, "lora", "style.safetensors"), sd, seed=seed + 3),
        "lora_2": write_tiny_lora(os.path.join(out, "lora", "subject.safetensors"), sd, seed=seed + 4,
                                  text_encoder=False),
        "textual_inversion": write_tiny_textual_inversion(os.path.join(out, "ti", "tinycat.safetensors"),
                                                          "<tinycat>", seed=seed + 5),
        "textual_inversion_wrong_dim": write_tiny_textual_inversion(
            os.path.join(out, "ti", "wide.safetensors"), "<wide>", dim=TINY_TEXT["hidden_size"] * 2, seed=seed + 6),
    }
    info["sdxl_model"] = write_tiny_sdxl(os.path.join(out, "sdxl-tiny"), seed=seed + 7)
    info["sdxl_refiner"] = write_tiny_sdxl_refiner(os.path.join(out, "sdxl-tiny-refiner"), info["sdxl_model"],
                                                   seed=seed + 8)
    # a LoRA made for another UNet (the SDXL one): it does not fit the SD pipeline
    info["lora_other_model"] = write_tiny_lora(os.path.join(out, "lora", "sdxl-unet.safetensors"),
                                               info["sdxl_model"], seed=seed + 9, text_encoder=False)
    safety = write_with_safety_checker(os.path.join(out, "sd-tiny-safety"), sd, seed=seed + 10)
    info["safety_model"] = safety["dir"]
    info["safety_threshold"] = safety["threshold"]
    with open(os.path.join(out, "tiny-generation.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info
