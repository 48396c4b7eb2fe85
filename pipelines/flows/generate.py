"""generate: a prompt table -> images, on Ray.

    prompt table -> image tasks (every parameter and seed fixed up front) -> output shards
    -> actor pool (one diffusers pipeline per actor: GenerateStage) -> driver -> writer task per
    shard (sinks/generated.py)

Output shards are img2dataset-style (``NNNNN.tar`` with ``KEY.png``, ``KEY.txt``, ``KEY.json``
and ``NNNNN.parquet``) at the top of OUTPUT, so ``shardsmith curate OUTPUT ...`` reads them
straight back. Commit, ledger and resume are every job's (``core/lifecycle.py``).
"""

from __future__ import annotations

import json

from shardsmith.pipelines.config.generate import GenerateConfig
from shardsmith.pipelines.core.lifecycle import run_job
from shardsmith.pipelines.flows.diffusion import diffuse_and_write, diffusion_plan, diffusion_spec, generated_run


def run_generate(cfg: GenerateConfig, log=print) -> dict:
    import ray

    from shardsmith.filters.diffusion import describe_model
    from shardsmith.pipelines.core.dispatch import ShardCollector
    from shardsmith.pipelines.core.progress import Progress
    from shardsmith.pipelines.formats.prompts import (IMAGE_MODES, captions_table, check_columns, plan_tasks,
                                                      read_prompt_table, resolve_sources, shard_tasks)
    from shardsmith.pipelines.formats.sources import index_images, table_folder
    from shardsmith.pipelines.stages.diffuse import GenerateStage

    cfg.validate("generate")
    spec = diffusion_spec(cfg)
    d = cfg.defaults
    if cfg.prompts:
        table = read_prompt_table(cfg.prompts)
        check_columns(table, cfg.extra_columns, cfg.prompts)  # before any work: no column is silently ignored
    else:
        table = captions_table(cfg.from_captions, cfg.limit,
                               with_images=d.mode in IMAGE_MODES or bool(d.controlnet and d.control))
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    tasks = plan_tasks(table, d, cfg.extra_columns)
    images_spec = cfg.images or cfg.from_captions
    resolve_sources(tasks, table_folder(cfg.prompts) if cfg.prompts else None,
                    index_images(images_spec) if images_spec and any(t.image for t in tasks) else None, images_spec)
    shards = shard_tasks(tasks, cfg.shard_size)

    def execute(todo: list[str]) -> None:
        plan = diffusion_plan(cfg)
        log(f"ray: {plan.describe()}")
        items = [it for name in todo for it in shard_items(name, shards[name], cfg)]
        # tasks of one adapter set, mode and parameter set next to each other, so that batches are homogeneous
        items.sort(key=lambda it: (it["shard"], it["params_key"], it["row"]))
        per_call = 1 if cfg.batch_forward else cfg.batch_size
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // max(per_call, 1), 200)))
        diffuse_and_write(ds, GenerateStage, (spec, plan.device, plan.torch_threads, cfg.watermark), plan, cfg,
                          Progress("generate", len(tasks_of(shards, todo)), len(todo), enabled=cfg.progress),
                          ShardCollector({n: len(shards[n]) for n in todo}), "generate (diffusion actors)", todo,
                          rows_per_call=per_call)

    what = f"{len(tasks)} image(s) from {len(table)} prompt row(s) in {len(shards)} shard(s)"
    run = generated_run(cfg, "generate", list(shards), describe_model(spec), [cfg.prompts or cfg.from_captions], what)
    return run_job(run, execute, log)


def tasks_of(shards: dict, todo: list[str]) -> list:
    return [t for n in todo for t in shards[n]]


def shard_items(name: str, tasks: list, cfg: GenerateConfig) -> list[dict]:
    """The dataset rows of one shard: a task each, or with ``batch_forward`` a list of up to
    batch_size tasks of one forward key (in shard order: the same batches on every run)."""
    singles, groups = [], {}
    for i, t in enumerate(tasks):
        fk = t.forward_key() if cfg.batch_forward else None
        if fk is None:
            singles.append({"shard": name, "row": i, "key": t.key, "task": json.dumps(t.to_dict()),
                            "params_key": t.group()})
        else:
            groups.setdefault(fk, []).append((i, t))
    for fk, members in groups.items():
        for c in range(0, len(members), cfg.batch_size):
            chunk = members[c:c + cfg.batch_size]
            singles.append({"shard": name, "row": chunk[0][0], "key": chunk[0][1].key, "params_key": fk,
                            "task": json.dumps([[i, t.to_dict()] for i, t in chunk])})
    return singles
