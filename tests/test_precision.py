"""Reduced precision for the CLIP towers: recorded, part of the fingerprint, never mixed in one
OUTPUT, deterministic on resume, and close to fp32."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from conftest import curate_config, read_scores

from shardsmith.errors import RunError
from shardsmith.filters.clip import resolve_precision
from shardsmith.pipelines.flows.curate import run_curate

QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def bf16_run(ray_local, tiny_models, sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "out"
    stats = run_curate(curate_config(sample["images"], out, tiny_models, precision="bf16", preset=None), **QUIET)
    return out, stats


def _files(out) -> dict[str, str]:
    digests = {}
    for d in ("scores", "curated"):
        for name in sorted(os.listdir(os.path.join(out, d))):
            with open(os.path.join(out, d, name), "rb") as f:
                digests[f"{d}/{name}"] = hashlib.sha256(f.read()).hexdigest()
    return digests


def test_precision_is_recorded_everywhere(bf16_run):
    out, stats = bf16_run
    assert stats["precision"] == ["bf16"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["fingerprint"]["precision"] == "bf16" and manifest["models"]["precision_used"] == ["bf16"]
    for entry in stats["shards"].values():
        assert entry["precision"] == ["bf16"]


def test_bf16_scores_are_close_to_fp32(bf16_run, tiny_models, sample, tmp_path):
    out, _ = bf16_run
    fp32 = run_curate(curate_config(sample["images"], tmp_path / "fp32", tiny_models, preset=None), **QUIET)
    assert fp32["precision"] == ["fp32"]
    a = {r["key"]: r for r in read_scores(out).to_pylist() if r["status"] != "error"}
    b = {r["key"]: r for r in read_scores(tmp_path / "fp32").to_pylist() if r["status"] != "error"}
    assert set(a) == set(b) and len(a) > 20
    for score, bound in (("pwatermark", 0.05), ("punsafe", 0.05), ("similarity", 0.05), ("aesthetic", 0.5)):
        diff = np.array([abs(a[k][score] - b[k][score]) for k in a])
        assert diff.max() < bound, (score, diff.max())
        assert diff.max() > 0, f"{score}: bf16 gave bit-identical scores: the towers did not run in bf16"


def test_a_resumed_bf16_run_is_byte_identical(bf16_run, tiny_models, sample, tmp_path):
    out, _ = bf16_run
    again = tmp_path / "again"
    shutil.copytree(out, again)
    for f in ("scores/00001.parquet", "curated/00001.tar", "curated/00001.parquet", "_ledger/00001.json"):
        os.remove(again / f)  # shard 00001 as if the run had been killed before committing it
    stats = run_curate(curate_config(sample["images"], again, tiny_models, precision="bf16", preset=None), **QUIET)
    assert stats["shards"]["00001"]["committed_at"] > stats["shards"]["00000"]["committed_at"]
    assert _files(again) == _files(out)


def test_a_resume_cannot_mix_precisions(bf16_run, tiny_models, sample, tmp_path):
    out, _ = bf16_run
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    os.remove(mixed / "_ledger" / "00002.json")
    with pytest.raises(RunError, match="precision"):  # another precision is another fingerprint
        run_curate(curate_config(sample["images"], mixed, tiny_models, precision="fp32", preset=None), **QUIET)


def test_auto_resolves_by_device():
    assert resolve_precision("auto", "cuda:0") == "fp16"
    assert resolve_precision("fp32", "cuda") == "fp32"
    assert resolve_precision("auto", "cpu") in ("bf16", "fp32")


def test_compiled_image_tower_matches_eager_on_frozen_weights(tiny_models):
    """``--compile``: the image tower through torch.compile with inductor's freezing. Its
    embeddings equal eager's within bf16's noise; the weights are folded into the graph (changing
    them afterwards changes eager's embeddings, not the compiled ones); and the freezing setting
    does not leak into the process's other compiles."""
    import torch
    import torch._inductor.config as inductor_config

    from shardsmith.filters.clip import ClipEmbedder, ClipSpec

    spec = ClipSpec(tiny_models["clip_model"], tiny_models["clip_pretrained"])
    compiled = ClipEmbedder(spec, precision="bf16", compile=True)
    eager = ClipEmbedder(spec, precision="bf16")
    pixels = np.random.default_rng(0).integers(0, 256, (4, *compiled.image_size, 3), dtype=np.uint8)
    got, want = compiled.embed_pixels(pixels), eager.embed_pixels(pixels)
    assert float((got * want).sum(axis=1).min()) > 0.999
    assert inductor_config.freezing is False
    with torch.no_grad():
        proj = compiled.model.visual.proj
        proj.add_(torch.randn(proj.shape, generator=torch.Generator().manual_seed(1)).to(proj.dtype))
    assert np.array_equal(compiled.embed_pixels(pixels), got)
    with torch.inference_mode():
        changed = torch.nn.functional.normalize(compiled.model.encode_image(
            compiled.pixels_to_tensor(pixels).to(compiled.input_dtype)).float(), dim=-1).numpy()
    assert not np.allclose(changed, got, atol=1e-3)  # the eager tower sees the new weights
