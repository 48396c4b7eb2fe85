"""augment: a webdataset's images -> img2img (SDEdit) variants, on Ray.

    input shards -> read (CPU tasks, curate's reader) -> actor pool (AugmentStage: N variants per
    source, each with its own derived seed) -> driver -> writer task per shard (sinks/generated.py)

One output shard per input shard, named after it, in the same layout as generate's.
"""

from __future__ import annotations

from shardsmith.pipelines.config.generate import GenerateConfig
from shardsmith.pipelines.core.lifecycle import run_job
from shardsmith.pipelines.flows.diffusion import diffuse_and_write, diffusion_plan, diffusion_spec, generated_run


def run_augment(cfg: GenerateConfig, log=print) -> dict:
    import ray

    from shardsmith.filters.diffusion import describe_model
    from shardsmith.pipelines.core.dispatch import ShardCollector
    from shardsmith.pipelines.core.progress import Progress
    from shardsmith.pipelines.core.resources import TASK_STAGE_ARGS
    from shardsmith.pipelines.formats.inputs import plan_shards
    from shardsmith.pipelines.stages.diffuse import AugmentStage
    from shardsmith.pipelines.stages.read import read_shard_rows

    cfg.validate("augment")
    spec = diffusion_spec(cfg)
    _, shards = plan_shards(cfg.input, "images")
    by_name = {s.name: s for s in shards}

    def execute(todo: list[str]) -> None:
        plan = diffusion_plan(cfg)
        log(f"ray: {plan.describe()}")
        ds = ray.data.from_items([{"shard": n, "url": by_name[n].url, "limit": cfg.limit} for n in todo],
                                 override_num_blocks=len(todo))
        ds = ds.map_batches(read_shard_rows, batch_size=1, num_cpus=plan.read_cpus, **TASK_STAGE_ARGS)
        urls = {n: by_name[n].url for n in todo}
        diffuse_and_write(ds, AugmentStage, (spec, plan.device, plan.torch_threads, cfg.watermark, cfg, urls), plan, cfg,
                          Progress("augment", None, len(todo), enabled=cfg.progress), ShardCollector(),
                          "augment (diffusion actors)", todo)

    what = f"{len(shards)} shard(s), {cfg.variants} variant(s) per image"
    run = generated_run(cfg, "augment", list(by_name), describe_model(spec), [s.to_dict() for s in shards], what)
    return run_job(run, execute, log)
