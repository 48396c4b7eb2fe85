"""The curate driver of a scale-out run: ``run_curate`` against ``--address``, recording when each
scored batch reaches the driver and which actor scored it; prints one JSON line.

Steady-state throughput = the rows that reached the driver while every scoring actor was busy
(from the moment the last actor delivered its first batch to the moment the first actor delivered
its last one), over that window: what the pool sustains while all of it works, leaving out
connecting and the actors' model load (which do not scale with nodes) and the tails where only
some actors still have work. Actors that ran one after the other have no common window: 0.

    python -m bench.scaleout_driver --address HOST:PORT --input SHARDS --output DIR --heads JSON
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--heads", required=True, help="JSON: aesthetic_head, watermark_head, nsfw_head paths")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)

    import pyarrow.compute as pc

    import shardsmith.pipelines.core.dispatch as collect
    from bench.data import CLIP_MODEL
    from shardsmith.pipelines.config import CurateConfig
    from shardsmith.pipelines.flows.curate import run_curate

    arrivals: list[tuple[float, str, int]] = []  # (time, scoring actor, scored rows) per block at the driver
    original = collect.ShardCollector.add

    def add(self, batch):
        now = time.perf_counter()
        real = batch.filter(pc.not_equal(batch.column("row"), -1))
        for actor in set(real.column("scorer").to_pylist()) if real.num_rows else ():
            arrivals.append((now, actor, int(pc.sum(pc.equal(real.column("scorer"), actor)).as_py())))
        return original(self, batch)

    collect.ShardCollector.add = add
    plan_line: list[str] = []
    shutil.rmtree(args.output, ignore_errors=True)
    cfg = CurateConfig(input=args.input, output=args.output, clip_model=CLIP_MODEL, clip_pretrained=None,
                       batch_size=args.batch_size, report=False, progress=True, address=args.address,
                       **json.loads(args.heads))
    t0 = time.perf_counter()
    stats = run_curate(cfg, log=lambda msg="", *a: plan_line.append(str(msg)) if str(msg).startswith("ray:") else None)
    seconds = time.perf_counter() - t0
    shutil.rmtree(args.output, ignore_errors=True)
    n = stats["rows_read"]
    per_actor = {}
    for actor in sorted({a for _, a, _ in arrivals}):
        mine = [(t, k) for t, a, k in arrivals if a == actor]
        per_actor[actor] = {"batches": len(mine), "rows": sum(k for _, k in mine),
                            "first_at_s": round(mine[0][0] - t0, 2), "last_at_s": round(mine[-1][0] - t0, 2)}
    start = max(min(t for t, a, _ in arrivals if a == actor) for actor in per_actor)  # every actor has started
    end = min(max(t for t, a, _ in arrivals if a == actor) for actor in per_actor)  # none has finished yet
    in_window = sum(k for t, _, k in arrivals if start < t <= end)
    steady = in_window / (end - start) if end > start else 0.0
    print(json.dumps({"images": n, "seconds": round(seconds, 2), "images_per_s": n / seconds,
                      "steady_images_per_s": steady, "steady_window_s": [round(start - t0, 2), round(end - t0, 2)],
                      "rows_in_window": in_window, "per_actor": per_actor,
                      "plan": plan_line[-1] if plan_line else None,
                      "scoring_actors": stats.get("scoring_actor_instances"),
                      "nodes_used": len(stats.get("node_ids", []))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
