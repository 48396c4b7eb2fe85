"""Resource planning and the shape of the curate dataflow on Ray."""

from __future__ import annotations

import contextlib
import io

from shardsmith.pipelines.core.resources import plan_resources


def test_cpu_plan_puts_an_actor_on_every_node():
    one = plan_resources(2, 0)  # a 2-core laptop: one actor whose threads take both cores, decoding in it
    assert (one.num_actors, one.actor_cpus, one.torch_threads, one.decode_in_actor) == (1, 1.5, 2, True)
    big = plan_resources(32, 0)  # a large CPU node: several actors of 8 threads
    assert (big.num_actors, big.torch_threads) == (4, 8)
    two = plan_resources(2, 0, nodes=[1.0, 1.0])  # two 1-CPU nodes: half of each node to an actor
    assert (two.num_actors, two.actor_cpus) == (2, 0.5)
    gpu = plan_resources(8, 2)
    assert (gpu.device, gpu.num_actors, gpu.actor_gpus) == ("cuda", 2, 1.0)


def test_read_and_decode_stay_apart_from_the_scoring_actors(ray_local, tmp_path):
    """On 1-CPU nodes the read/decode tasks and the scoring actors ask for the same 0.5 CPU; Ray
    Data would then fuse them into the actors (reads serial with the model, one actor per read
    group). The optimized physical plan must keep ScoreStage an operator of its own."""
    from shardsmith.pipelines.config import CurateConfig
    from shardsmith.pipelines.flows.curate_images import build_dataset
    from shardsmith.pipelines.formats.inputs import InputShard

    plan = plan_resources(2, 0, nodes=[1.0, 1.0])
    assert plan.decode_cpus == plan.actor_cpus  # the case that fused
    shards = [InputShard(f"{i:05d}", str(tmp_path / f"{i:05d}.tar"), "tar", size=1000) for i in range(4)]
    cfg = CurateConfig(input=str(tmp_path), output=str(tmp_path / "out"), batch_size=8)
    for read_fn in (None, lambda b: b):  # images mode; urls mode (download stage, then decode)
        ds = build_dataset(shards, cfg, spec=None, pixel_transform=None, image_size=(32, 32), plan=plan,
                           read_fn=read_fn, read_kwargs={})
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            ds.explain()
        physical = out.getvalue().split("Physical Plan (Optimized)")[1]
        actor_ops = [line.strip() for line in physical.splitlines() if "ActorPoolMapOperator" in line]
        assert actor_ops == ["ActorPoolMapOperator[MapBatches(ScoreStage)]"], physical
