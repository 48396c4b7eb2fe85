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
from shardsmith.pipelines.flows.diffusion import diffuse_and_write, diffusion_plan, generated_run


def run_generate(cfg: GenerateConfig, log=print) -> dict:
    import ray

    from shardsmith.filters.diffusion import DiffusionSpec, describe_model
    from shardsmith.pipelines.core.dispatch import ShardCollector
    from shardsmith.pipelines.core.progress import Progress
    from shardsmith.pipelines.formats.prompts import captions_table, plan_tasks, read_prompt_table, shard_tasks
    from shardsmith.pipelines.stages.diffuse import GenerateStage

    cfg.validate("generate")
    spec = DiffusionSpec(cfg.model, cfg.revision, cfg.scheduler, cfg.dtype)
    spec.validate()
    table = read_prompt_table(cfg.prompts) if cfg.prompts else captions_table(cfg.from_captions, cfg.limit)
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    tasks = plan_tasks(table, cfg.defaults)
    shards = shard_tasks(tasks, cfg.shard_size)

    def execute(todo: list[str]) -> None:
        plan = diffusion_plan(cfg)
        log(f"ray: {plan.describe()}")
        items = [{"shard": name, "row": i, "key": t.key, "task": json.dumps(t.to_dict()),
                  "params_key": json.dumps(t.params())} for name in todo for i, t in enumerate(shards[name])]
        # tasks of one parameter set next to each other, so that batches are homogeneous
        items.sort(key=lambda it: (it["shard"], it["params_key"], it["row"]))
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // max(cfg.batch_size, 1), 200)))
        diffuse_and_write(ds, GenerateStage, (spec, plan.device, plan.torch_threads, cfg.watermark), plan, cfg,
                          Progress("generate", len(items), len(todo), enabled=cfg.progress),
                          ShardCollector({n: len(shards[n]) for n in todo}), "generate (diffusion actors)", todo)

    what = f"{len(tasks)} image(s) from {len(table)} prompt row(s) in {len(shards)} shard(s)"
    run = generated_run(cfg, "generate", list(shards), describe_model(spec), [cfg.prompts or cfg.from_captions], what)
    return run_job(run, execute, log)
