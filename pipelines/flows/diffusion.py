"""What generate and augment share: the diffusion actors' plan, the stage-and-writer tail of the
dataflow, and the run spec of an output of generated shards."""

from __future__ import annotations

import dataclasses

from shardsmith.pipelines.config.generate import GenerateConfig
from shardsmith.pipelines.core.dispatch import (
    Dispatcher,
    ShardCollector,
    progress_on_commit,
    stop_dataset,
    stream_to_writers,
)
from shardsmith.pipelines.core.lifecycle import RunSpec
from shardsmith.pipelines.sinks.generated import write_generated_shard


def diffusion_plan(cfg: GenerateConfig):
    """Actors and their torch threads. On CPU the thread count defaults to what torch uses in a
    plain process here (Ray would set 1), so that images equal a direct diffusers call's."""
    import torch

    from shardsmith.pipelines.core.resources import cluster_resources, node_cpus, plan_resources

    cpus, gpus = cluster_resources()
    plan = plan_resources(cpus, gpus, cfg.device, cfg.num_actors, cfg.actor_cpus, nodes=node_cpus())
    if plan.device == "cpu":
        plan = dataclasses.replace(plan, torch_threads=cfg.threads or torch.get_num_threads())
    return plan


def diffusion_spec(cfg: GenerateConfig):
    from shardsmith.errors import ConfigError
    from shardsmith.filters.diffusion import DiffusionSpec, resolve_model, ships_safety_checker

    spec = DiffusionSpec(cfg.model, cfg.revision, cfg.scheduler, cfg.dtype, cfg.safety_checker, cfg.compile)
    spec.validate()
    if spec.safety_checker == "on" and ships_safety_checker(resolve_model(spec.model)) is False:
        raise ConfigError(f"safety_checker on: {cfg.model} ships no safety checker (its model_index.json)")
    return spec


def diffuse_and_write(ds, stage, stage_args: tuple, plan, cfg: GenerateConfig, progress,
                      collector: ShardCollector, label: str = "diffusion", names: list[str] | None = None,
                      rows_per_call: int | None = None) -> None:
    """``stage`` (one diffusers pipeline per actor) over ``ds``; each complete shard is handed to a
    writer task that commits it."""
    import ray

    from shardsmith.pipelines.core.resources import actor_pool

    ds = ds.map_batches(stage, fn_constructor_args=stage_args, compute=actor_pool(plan.num_actors),
                        batch_size=rows_per_call or cfg.batch_size, num_cpus=plan.actor_cpus,
                        num_gpus=plan.actor_gpus)
    writer = ray.remote(num_cpus=plan.write_cpus, max_retries=3)(write_generated_shard)
    dispatcher = Dispatcher(window=max(2, 2 * plan.num_actors), on_done=progress_on_commit(progress),
                            stall_timeout=cfg.stall_timeout, stage="write")
    stream_to_writers(ds.iter_batches(batch_size=None, batch_format="pyarrow"), collector,
                      lambda name, rows: writer.remote(name, rows, cfg.output), dispatcher, progress, stage=label,
                      names=names, on_stop=lambda e: stop_dataset(ds, e))


def generated_run(cfg: GenerateConfig, tool: str, names: list[str], models: dict, inputs: list, what: str) -> RunSpec:
    return RunSpec(
        tool=tool, output=cfg.output, shards=names, fingerprint=cfg.fingerprint(tool), config=cfg.to_dict(),
        models=models, inputs=inputs, what=what, overwrite=cfg.overwrite, address=cfg.address,
        parts=tuple(f"{n}.{e}" for n in names for e in ("tar", "parquet")),
        extra_stats=lambda stats, layout, log: {"generated": stats["kept"]},
        summary_title=f"\n{tool} summary ({len(names)} shards; kept = images made)",
        summary_notes=[f"\noutputs in {cfg.output}: NNNNN.tar + NNNNN.parquet (curate reads them back), stats.json"],
        lock_ttl=cfg.lock_ttl, break_lock=cfg.break_lock)
