"""The LAION heads: architecture, original-format state dicts, and scores equal to a reference."""

import io

import numpy as np
import pytest
import torch
from torch import nn

from shardsmith.filters.fit import fit_probability_head
from shardsmith.filters.heads import AestheticMLP, NsfwHead, ProbabilityHead, load_head
from shardsmith.filters.weights import WeightsError


class ReferenceMLP(nn.Module):
    """Written as in christophschuhmann/improved-aesthetic-predictor (simple_inference.py)."""

    def __init__(self, input_size):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def test_original_format_state_dict_loads_and_matches_reference(tmp_path):
    torch.manual_seed(3)
    ref = ReferenceMLP(768).eval()
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(ref.state_dict(), path)
    assert sorted(torch.load(path, weights_only=True)) == sorted(
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    head = load_head("aesthetic", str(path), embed_dim=768)
    assert isinstance(head, AestheticMLP)
    x = torch.nn.functional.normalize(torch.randn(32, 768), dim=-1)
    with torch.no_grad():
        np.testing.assert_allclose(head(x).numpy(), ref(x).squeeze(-1).numpy(), rtol=0, atol=1e-6)


def test_embed_dim_mismatch_is_explained(tmp_path):
    path = tmp_path / "a.pth"
    torch.save(AestheticMLP(768).state_dict(), path)
    with pytest.raises(WeightsError, match="expects 768-d embeddings but the CLIP model gives 512-d"):
        load_head("aesthetic", str(path), embed_dim=512)


def test_wrong_keys_are_named(tmp_path):
    path = tmp_path / "a.pth"
    torch.save({"layers.0.weight": torch.zeros(4, 8)}, path)
    with pytest.raises(WeightsError, match="missing keys"):
        load_head("aesthetic", str(path))


def test_pickled_module_is_refused_with_conversion_hint(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(AestheticMLP(16), path)  # a whole pickled module, not a state dict
    with pytest.raises(WeightsError, match="convert it once"):
        load_head("aesthetic", str(path))


def test_nsfw_head_safetensors_and_normalization(tmp_path):
    """The weights file written here in LAION's layout (keras Normalization's mean and variance, then
    Dense 64/512/256/1), and the expectation computed as the Keras model does: (x - mean) /
    max(sqrt(var), 1e-7), relu, relu, relu, sigmoid. Nothing of shardsmith's NsfwHead is used."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    dim, sizes = 32, [64, 512, 256, 1]
    sd = {"norm_mean": torch.empty(dim).uniform_(-0.1, 0.1, generator=g),
          "norm_var": torch.empty(dim).uniform_(0.5, 2.0, generator=g)}
    fan_in = dim
    for i, n in zip((0, 2, 4, 6), sizes):
        sd[f"layers.{i}.weight"] = torch.randn(n, fan_in, generator=g) / fan_in ** 0.5
        sd[f"layers.{i}.bias"] = torch.randn(n, generator=g) * 0.1
        fan_in = n
    # A feature constant in the detector's training set: keras divides by epsilon (1e-7), not by
    # sqrt(epsilon). Inputs a few 1e-7 off its mean then reach the MLP at unit scale.
    sd["norm_var"][0] = 0.0
    sd["layers.0.weight"][:, 0] *= 20
    path = tmp_path / "nsfw.safetensors"
    save_file(sd, str(path))
    loaded = load_head("punsafe", str(path), embed_dim=dim)
    x = torch.randn(8, dim, generator=g)
    x[:, 0] = sd["norm_mean"][0] + 1e-7 * torch.randn(8, generator=g)
    h = (x - sd["norm_mean"]) / torch.maximum(sd["norm_var"].sqrt(), torch.tensor(1e-7))
    for i in (0, 2, 4):
        h = torch.relu(h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"])
    expected = torch.sigmoid(h @ sd["layers.6.weight"].T + sd["layers.6.bias"]).squeeze(-1)
    with torch.no_grad():
        got = loaded(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert ((got >= 0) & (got <= 1)).all() and got.std() > 0


def test_fit_probability_head_separates_labelled_embeddings():
    rng = np.random.default_rng(0)
    pos = rng.normal(0.3, 0.1, (50, 16))
    neg = rng.normal(-0.3, 0.1, (50, 16))
    fit = fit_probability_head(np.vstack([pos, neg]), np.r_[np.ones(50), np.zeros(50)])
    assert fit.train_accuracy > 0.95
    buf = io.BytesIO()
    torch.save(fit.head.state_dict(), buf)
    again = ProbabilityHead.from_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    x = torch.randn(4, 16)
    torch.testing.assert_close(again(x), fit.head(x))


class NemoNSFWModel(nn.Module):
    """Written as NeMo Curator's PyTorch port of LAION's NSFW detector (NSFWModel)."""

    class Normalization(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.register_buffer("mean", torch.zeros(shape))
            self.register_buffer("variance", torch.ones(shape))

        def forward(self, x):
            return (x - self.mean) / self.variance.sqrt()

    def __init__(self, d=768):
        super().__init__()
        self.norm = self.Normalization([d])
        self.linear_1, self.linear_2 = nn.Linear(d, 64), nn.Linear(64, 512)
        self.linear_3, self.linear_4 = nn.Linear(512, 256), nn.Linear(256, 1)

    def forward(self, x):
        x = self.norm(x)
        x = torch.relu(self.linear_1(x))
        x = torch.relu(self.linear_2(x))
        x = torch.relu(self.linear_3(x))
        return torch.sigmoid(self.linear_4(x))


def test_nsfw_pytorch_port_loads_as_is_and_matches_reference(tmp_path):
    torch.manual_seed(5)
    ref = NemoNSFWModel(48).eval()
    with torch.no_grad():
        ref.norm.mean.uniform_(-0.05, 0.05)
        ref.norm.variance.uniform_(5e-4, 2e-3)
        ref.linear_4.bias.fill_(0.5)
    path = tmp_path / "clip_autokeras_binary_nsfw.pth"
    torch.save(ref.state_dict(), path)
    head = load_head("punsafe", str(path), embed_dim=48, arch="laion-nsfw-torch")
    x = torch.nn.functional.normalize(torch.randn(16, 48), dim=-1)
    with torch.no_grad():
        expected, got = ref(x).squeeze(-1), head(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert float(got.std()) > 1e-3
    with pytest.raises(WeightsError, match="laion-nsfw-torch"):
        load_head("punsafe", str(path), arch="laion-nsfw")  # the other layout's keys are named


def test_nsfw_head_reads_its_sizes_from_the_file(tmp_path):
    head = NsfwHead(20, hidden=(32, 32)).eval()  # the B/32 detector's shape
    path = tmp_path / "b32.pth"
    torch.save(head.state_dict(), path)
    loaded = load_head("punsafe", str(path), embed_dim=20)
    assert [m.out_features for m in loaded.layers if isinstance(m, nn.Linear)] == [32, 32, 1]
