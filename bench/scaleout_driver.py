"""The curate driver of a scale-out run: ``run_curate`` against ``--address``, recording when each
scored batch reaches the driver; prints one JSON line (rates, timeline, plan).

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

    import pipelines.progress as progress
    from bench.data import CLIP_MODEL
    from pipelines.config import CurateConfig
    from pipelines.curate import run_curate

    arrivals: list[tuple[float, int]] = []
    original = progress.Progress.update

    def update(self, rows: int = 0, shards: int = 0, force: bool = False):
        if rows:
            arrivals.append((time.perf_counter(), rows))
        return original(self, rows, shards, force)

    progress.Progress.update = update
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
    first_t, first_rows = arrivals[0]
    last_t = arrivals[-1][0]
    steady = (n - first_rows) / (last_t - first_t) if last_t > first_t else float("nan")
    print(json.dumps({"images": n, "seconds": round(seconds, 2), "images_per_s": n / seconds,
                      "steady_images_per_s": steady, "first_batch_at_s": round(first_t - t0, 2),
                      "last_batch_at_s": round(last_t - t0, 2), "plan": plan_line[-1] if plan_line else None,
                      "actors": stats.get("scoring_actor_instances"), "scorers": stats.get("scoring_actor_instances"),
                      "nodes_used": len(stats.get("node_ids", []))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
