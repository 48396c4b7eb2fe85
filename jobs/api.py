"""The Python API: every job as a function, for notebooks and orchestrators (``import shardsmith``).

Each function takes a config object, a mapping or a YAML file (``config=``), and/or the config's
keys as keyword arguments (they win over ``config``), validates them exactly as the CLI does,
runs the job and returns its stats (what ``OUTPUT/stats.json`` holds). A configuration or input
problem raises a :class:`shardsmith.ShardsmithError` (``ConfigError``, ``InputError``,
``RunError``) with the same one-line message the CLI prints; a rerun into the same OUTPUT
resumes. ``log`` receives the progress and summary lines (``print`` by default; pass
``lambda *a: None`` to silence them).

    import shardsmith
    stats = shardsmith.curate("data/{00000..00009}.tar", "out/curated", preset="none",
                              clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k",
                              rules=["min_side >= 256"])
    stats["kept"], stats["dropped_by_reason"]
"""

from __future__ import annotations

from typing import Callable

__all__ = ["curate", "download", "generate", "augment", "recurate", "report", "fit_head"]


def _config(cls, config, options: dict, **fixed):
    from shardsmith.pipelines.config.base import from_dict, load_config_file

    if config is None:
        cfg = cls()
    elif isinstance(config, cls):
        cfg = config
    elif isinstance(config, dict):
        cfg = from_dict(cls, config)
    elif isinstance(config, str):
        cfg = from_dict(cls, load_config_file(config), source=f"config {config}")
    else:
        raise TypeError(f"config: expected a {cls.__name__}, a mapping or a YAML path, got {type(config).__name__}")
    given = {k: v for k, v in fixed.items() if v is not None}
    return from_dict(cls, {**options, **given}, base=cfg, source="arguments")


def curate(input: str | None = None, output: str | None = None, config=None, log: Callable = print,
           **options) -> dict:
    """Score and filter INPUT into OUTPUT (``shardsmith curate``); options are CurateConfig keys."""
    from shardsmith.pipelines.config import CurateConfig
    from shardsmith.pipelines.flows.curate import run_curate

    return run_curate(_config(CurateConfig, config, options, input=input, output=output), log=log)


def download(input: str | None = None, output: str | None = None, config=None, log: Callable = print,
             **options) -> dict:
    """Fetch LAION metadata's URLs into img2dataset-layout shards (``shardsmith download``)."""
    from shardsmith.pipelines.config import CurateConfig
    from shardsmith.pipelines.flows.download import run_download

    base = CurateConfig(preset=None, mode="urls")
    cfg = _config(CurateConfig, config if config is not None else base, options, input=input, output=output)
    return run_download(cfg, log=log)


def generate(prompts: str | None = None, output: str | None = None, config=None, log: Callable = print,
             **options) -> dict:
    """Images from a prompt table (``shardsmith generate``); options are GenerateConfig keys."""
    from shardsmith.pipelines.config.generate import GenerateConfig
    from shardsmith.pipelines.flows.generate import run_generate

    return run_generate(_config(GenerateConfig, config, options, prompts=prompts, output=output), log=log)


def augment(input: str | None = None, output: str | None = None, config=None, log: Callable = print,
            **options) -> dict:
    """img2img variants of a webdataset's images (``shardsmith augment``)."""
    from shardsmith.pipelines.config.generate import GenerateConfig
    from shardsmith.pipelines.flows.augment import run_augment

    return run_augment(_config(GenerateConfig, config, options, input=input, output=output), log=log)


def recurate(run: str | None = None, output: str | None = None, config=None, log: Callable = print,
             **options) -> dict:
    """A new selection from a finished run's stored scores and embeddings (``shardsmith recurate``);
    options are RecurateConfig keys (``preset``, ``rules``, ``heads`` ...)."""
    from shardsmith.pipelines.config.recurate import RecurateConfig
    from shardsmith.pipelines.flows.recurate import run_recurate

    return run_recurate(_config(RecurateConfig, config, options, run=run, output=output), log=log)


def report(output: str, per_grid: int = 16) -> str:
    """Write OUTPUT/report.html for a finished run; returns its URL (``shardsmith report``)."""
    from shardsmith.pipelines.report import build_report

    return build_report(output, per_grid=per_grid)


def fit_head(output: str | None = None, run: str | None = None, labels: str | None = None, config=None,
             log: Callable = print, **options) -> dict:
    """Fit a CLIP-based head on labelled embeddings (``shardsmith fit-head``); options are
    FitHeadConfig keys (``images=...`` embeds labelled images on the fly). Returns the head's card."""
    from shardsmith.pipelines.config.fit_head import FitHeadConfig
    from shardsmith.pipelines.flows.fit_head import run_fit_head

    return run_fit_head(_config(FitHeadConfig, config, options, output=output, run=run, labels=labels), log=log)
