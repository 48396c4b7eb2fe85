"""Shared fixtures: one local Ray for the whole session, tiny models and a small sample dataset
built once. Everything is real (Ray, open_clip, parquet, tar); only the model sizes are tiny."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from shardsmith.pipelines.core.resources import ray_session

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    with ray_session():
        yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from shardsmith.jobs.tiny_models import make_tiny_models

    return make_tiny_models(str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    from shardsmith.jobs.sample_data import make_sample_data

    return make_sample_data(str(tmp_path_factory.mktemp("sample")), shards=3, per_shard=20,
                            metadata_files=2, metadata_rows=400, max_size=200)


def curate_config(input, output, models, **kw):
    from shardsmith.pipelines.config import CurateConfig

    base = dict(input=str(input), output=str(output), clip_model=models["clip_model"],
                clip_pretrained=models["clip_pretrained"], aesthetic_head=models["aesthetic_head"],
                watermark_head=models["watermark_head"], nsfw_head=models["nsfw_head"], progress=False,
                batch_size=16, report=False, precision="fp32")  # the reference computations are fp32
    base.update(kw)
    return CurateConfig(**base)


def read_scores(output):
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(str(output), "scores", "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files])


@pytest.fixture(scope="session")
def generation_models(tiny_models, tmp_path_factory):
    """Inpainting model, ControlNet, LoRAs, embeddings, SDXL base + refiner, a safety checker that
    flags (jobs/tiny_generation.py), beside the session's tiny SD pipeline."""
    from shardsmith.jobs.tiny_generation import make_generation_models

    return make_generation_models(str(tmp_path_factory.mktemp("gen-models")), sd_dir=tiny_models["sd_model"])
