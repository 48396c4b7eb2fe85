"""The CLIP towers as curate runs them: captions encoded on their own tokens, reduced precision as
open_clip's own. Every reference here is open_clip itself: ``encode_text`` on the whole 77-token
context, and a model open_clip made with ``precision="bf16"``."""

import os

import numpy as np
import open_clip
import pytest
import torch

from shardsmith.filters.clip import ClipEmbedder, ClipSpec, _causal_text_tower

WORDS = "a photo of the red cat on blue vintage poster art design house for sale new old".split()


def captions(n: int, seed: int = 0) -> list[str]:
    """Captions of 0 to ~100 words: from a lone end-of-text token to past the 77-token context."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(k))) for k in rng.integers(0, 100, n)] + ["", "x " * 200]


def open_clip_model(models, precision="fp32"):
    """The tiny model as open_clip builds it by itself, with the tiny weights."""
    name = os.path.splitext(os.path.basename(models["clip_model"]))[0]
    open_clip.add_model_config(models["clip_model"])
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=models["clip_pretrained"],
                                                        precision=precision, weights_only=True)
    return model.eval(), open_clip.get_tokenizer(name)


def reference_texts(model, tokenizer, texts):
    with torch.inference_mode():
        return torch.nn.functional.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1).numpy()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_captions_on_their_own_tokens_equal_encode_text_on_the_whole_context(tiny_models, precision):
    e = ClipEmbedder(ClipSpec(tiny_models["clip_model"], tiny_models["clip_pretrained"]), precision=precision)
    model, tokenizer = open_clip_model(tiny_models, precision)
    texts = captions(40)
    got, ref = e.embed_texts(texts), reference_texts(model, tokenizer, texts)
    assert np.abs(got - ref).max() <= 1e-6


def test_a_captions_embedding_does_not_depend_on_its_neighbours(tiny_models):
    e = ClipEmbedder(ClipSpec(tiny_models["clip_model"], tiny_models["clip_pretrained"]))
    texts = captions(30, seed=1)
    together = e.embed_texts(texts)
    alone = np.concatenate([e.embed_texts([t]) for t in texts])
    shuffled = e.embed_texts(texts[::-1])[::-1]
    assert np.array_equal(together, alone) and np.array_equal(together, shuffled)


def test_short_captions_run_on_fewer_tokens(tiny_models):
    e = ClipEmbedder(ClipSpec(tiny_models["clip_model"], tiny_models["clip_pretrained"]))
    lengths = []
    hook = e.model.token_embedding.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    try:
        e.embed_texts(["a red cat", "a photo of a blue house"])
    finally:
        hook.remove()
    assert lengths and max(lengths) <= 16, lengths  # not the 77 of the context


def test_other_text_towers_see_the_whole_context(tiny_models):
    model, _ = open_clip_model(tiny_models)
    assert _causal_text_tower(model) is not None
    model.text_pool_type = "last"  # pooled at the last position: the padding would matter
    assert _causal_text_tower(model) is None
    model.text_pool_type = "argmax"
    model.attn_mask = None  # a bidirectional tower: every token sees the padding
    assert _causal_text_tower(model) is None


def test_bf16_is_open_clips_own_mixed_precision(tiny_models):
    """The bf16 towers are what open_clip's ``precision="bf16"`` makes (LayerNorm in fp32), to the bit."""
    e = ClipEmbedder(ClipSpec(tiny_models["clip_model"], tiny_models["clip_pretrained"]), precision="bf16")
    model, _ = open_clip_model(tiny_models, "bf16")
    assert e.model.visual.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert e.model.visual.ln_post.weight.dtype == torch.float32
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, *e.image_size, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD  # the tiny config's
    x = ((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).to(torch.bfloat16)
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1).numpy()
    assert np.array_equal(e.embed_pixels(pixels), ref)
    fp32 = ClipEmbedder(ClipSpec(tiny_models["clip_model"], tiny_models["clip_pretrained"]))
    assert not np.array_equal(fp32.embed_pixels(pixels), ref)  # bf16 really ran
