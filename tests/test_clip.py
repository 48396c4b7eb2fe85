
import numpy as np
import torch
from PIL import Image

from shardsmith.filters.clip import ClipEmbedder, ClipSpec
from shardsmith.filters.weights import WeightsError


def test_split_preprocess_is_exactly_open_clip_preprocess(tiny_models):
    e = ClipEmbedder(ClipSpec(tiny_models["clip_model"], tiny_models["clip_pretrained"]))
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 300), (333, 97), (1, 1)]]
    imgs.append(Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA"))
    imgs.append(imgs[0].convert("P"))
    ours = e.pixels_to_tensor(np.stack([e.pixel_transform(im) for im in imgs]))
    ref = torch.stack([e.preprocess(im) for im in imgs])
    assert torch.equal(ours, ref)


def test_unknown_model_name_is_explained():
    import pytest

    with pytest.raises(WeightsError, match="unknown open_clip model 'ViT-Nope'"):
        ClipEmbedder(ClipSpec("ViT-Nope", None))
