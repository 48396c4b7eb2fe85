"""dedup: exact, perceptual and semantic near-duplicates across curate outputs, every row kept or a
duplicate of a better one.

    plan: the RUNs' curated shards (ledgers, manifests), row ids, buckets, k
    -> stages, each a run of the lifecycle whose units share the one ledger (stages/dedup.py):
       kmeans -> fp.S -> near.B -> sem.A-B / sem.C.I (planned from the cluster sizes) -> best.S
    -> the output shards S (sinks/dedup.py): dedup/, curated/; stats with the groups; the report
"""

from __future__ import annotations

import json

from shardsmith.errors import InputError
from shardsmith.pipelines.config.dedup import DedupConfig
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.core.layout import OutputLayout
from shardsmith.pipelines.core.ledger import Ledger
from shardsmith.pipelines.core.lifecycle import RunSpec, run_job
from shardsmith.pipelines.formats.dedup import PARTS, WORK_DIR, work_file
from shardsmith.pipelines.formats.embeddings import EMB_DIR
from shardsmith.pipelines.stages.dedup import DedupShard


def plan_dedup(cfg: DedupConfig) -> list[DedupShard]:
    """Every committed shard of every RUN, in RUN order then shard order, from the RUNs' own
    manifests and ledgers (stats.json): nothing of the data is read."""
    shards, base = [], 0
    for r, run in enumerate(cfg.runs):
        try:
            manifest = json.loads(fsutil.read_text(fsutil.join(run, "manifest.json")))
            stats = json.loads(fsutil.read_text(fsutil.join(run, "stats.json")))
        except FileNotFoundError as e:
            raise InputError(f"{run}: not a finished curate OUTPUT (no manifest.json/stats.json)") from e
        if manifest.get("tool") != "shardsmith curate" or stats.get("mode") not in ("images", "urls"):
            raise InputError(f"{run}: not the OUTPUT of an images or urls curate run ({manifest.get('tool')}, "
                             f"mode {stats.get('mode')}): dedup needs images")
        if "semantic" in cfg.methods and not fsutil.exists(fsutil.join(run, EMB_DIR)):
            raise InputError(f"{run} has no embeddings ({EMB_DIR}/): curate it with --embeddings, or leave "
                             "semantic out (--methods exact,phash)")
        for name, entry in sorted(stats.get("shards", {}).items()):
            out = name if len(cfg.runs) == 1 else f"r{r}_{name}"
            shards.append(DedupShard(out, len(shards), r, run, name, base, int(entry["kept"])))
            base += int(entry["kept"])
    return shards


def run_dedup(cfg: DedupConfig, log=print) -> dict:
    import ray

    from shardsmith.pipelines.core.resources import ray_session
    from shardsmith.pipelines.sinks import dedup as sink
    from shardsmith.pipelines.stages import dedup as st

    cfg.validate()
    shards = plan_dedup(cfg)
    names = [s.name for s in shards]
    rows = sum(s.rows for s in shards)
    buckets, k = cfg.auto_buckets(rows), cfg.auto_clusters(rows)
    near = [m for m in cfg.methods if m != "semantic"]
    inputs = [s.to_dict() for s in shards]
    first = [True]
    layout = OutputLayout(cfg.output)

    def stage(title: str, units: list[str], tasks, final: bool = False, **spec) -> dict:
        """One run of the lifecycle: ``tasks(todo)`` -> Ray ObjectRefs, a bounded window in flight."""
        from shardsmith.pipelines.core.dispatch import Dispatcher, progress_on_commit
        from shardsmith.pipelines.core.progress import Progress

        def execute(todo: list[str]) -> None:
            progress = Progress(f"dedup {title}", None, len(todo), enabled=cfg.progress)
            window = Dispatcher(max(4, 2 * int(ray.cluster_resources().get("CPU", 1))), progress_on_commit(progress))
            for ref in tasks(todo):
                window.submit(ref, tag=0)
            window.drain(poll_every=1.0)
            progress.update(force=True)

        run = RunSpec(tool="dedup", output=cfg.output, shards=units, fingerprint=cfg.fingerprint(),
                      config=cfg.to_dict(), models={"buckets": buckets, "clusters": k}, inputs=inputs,
                      what=f"{title}: {len(units)} unit(s)", parts=PARTS, overwrite=cfg.overwrite and first[0],
                      address=cfg.address, final=final, **spec)
        first[0] = False
        return run_job(run, execute, log)

    fingerprint, bucket, block, best = (ray.remote(num_cpus=1, max_retries=2)(f) for f in (
        st.fingerprint_shard, st.near_bucket, st.cluster_block, st.best_pointers))
    with ray_session(cfg.address):
        from shardsmith.pipelines.core.resources import node_cpus

        # k-means is one task: it takes a whole node (faiss's threads follow its CPUs)
        fit = ray.remote(num_cpus=max(node_cpus() or [1.0]), max_retries=2)(st.fit_centroids)
        done = set(Ledger(layout).committed()) if not cfg.overwrite else set()
        by = {s.name: s for s in shards}
        if not set(names) <= done:  # the output shards are not all committed: the stages before them
            log(f"dedup: {len(shards)} shard(s), {rows} row(s) from {len(cfg.runs)} RUN(s); methods "
                f"{', '.join(cfg.methods)}; {buckets} bucket(s)" + (f", k = {k}" if "semantic" in cfg.methods else ""))
            if "semantic" in cfg.methods:
                sample = cfg.auto_sample(rows, k)
                stage("kmeans", ["kmeans"], lambda todo: [fit.remote(
                    shards, k, sample, cfg.kmeans_iters, cfg.seed, cfg.output)])
            stage("fingerprints", [f"fp.{n}" for n in names], lambda todo: [
                fingerprint.remote(by[u[3:]], cfg.methods, cfg.bands(), buckets, cfg.probes, cfg.keep == "first-run",
                                   cfg.output) for u in todo])
            pair_files = []
            if near:
                near_files = [layout.path(work_file("near", f"{n}.parquet")) for n in names]
                stage("exact+phash", [f"near.{b:05d}" for b in range(buckets)], lambda todo: [
                    bucket.remote(int(u[5:]), near_files, cfg.phash_max_distance, cfg.block_rows, cfg.output)
                    for u in todo])
                pair_files += [layout.path(work_file("pairs", f"near-{b:05d}.parquet")) for b in range(buckets)]
            if "semantic" in cfg.methods:
                units = st.semantic_units(cfg.output, names, cfg.block_rows)
                sem_files = [layout.path(work_file("sem", f"{n}.parquet")) for n in names]
                stage("semantic", units, lambda todo: [
                    block.remote(u, sem_files, cfg.semantic_min_cosine, cfg.block_rows, cfg.output) for u in todo])
                pair_files += [layout.path(st.semantic_file(u)) for u in units]
            stage("matches", [f"best.{n}" for n in names], lambda todo: [
                best.remote(by[u[5:]], pair_files, cfg.output) for u in todo])
        writer = ray.remote(num_cpus=0.5, max_retries=2)(sink.write_dedup_shard)

        def extra_stats(stats: dict, layout, log) -> dict:
            return {"mode": "dedup", "methods": cfg.methods, "keep": cfg.keep,
                    "thresholds": {"phash_max_distance": cfg.phash_max_distance,
                                   "semantic_min_cosine": cfg.semantic_min_cosine},
                    "duplicates": stats["dropped"], "survivors": stats["kept"],
                    **sink.group_stats(cfg.output, names, cfg.methods, stats["dropped"])}

        stats = stage("output", names, lambda todo: [writer.remote(by[n], names, cfg.output) for n in todo],
                      final=True, extra_stats=extra_stats,
                      summary_title=f"\ndedup summary ({len(shards)} shards; kept = survivors, dropped = duplicates)",
                      summary_notes=[f"\noutputs in {cfg.output}: dedup/, curated/ (img2dataset layout), stats.json"],
                      after=report_after if cfg.report else None)
    if not cfg.keep_work:  # every stage is committed: the work files are spent
        fsutil.remove(layout.path(WORK_DIR), recursive=True)
    return stats


def report_after(output: str, log) -> None:
    from shardsmith.pipelines.report import report_after_run

    report_after_run(output, log=log)
