"""curate: score and filter a LAION-style dataset, every input row kept, dropped or an error.

    plan shards (images: webdataset tars; metadata: LAION parquet; urls: LAION parquet to fetch)
    -> check the rules against the scores, the model and every head (before any work)
    -> the run lifecycle (core/lifecycle.py), whose execute step is:
         images, urls: the images dataflow (flows/curate_images.py)
         metadata:     one Ray task per parquet file (sinks/metadata.py), a bounded window in flight
    -> stats: duplicate keys across shards, the scores computed; the report
"""

from __future__ import annotations

import dataclasses

from shardsmith.errors import ConfigError
from shardsmith.filters.clip import ClipSpec
from shardsmith.filters.heads import pin_heads
from shardsmith.filters.predictors import clip_name
from shardsmith.filters.rules import BASE_RANGES
from shardsmith.filters.scorer import Scorer, ScorerSpec
from shardsmith.pipelines.config import CurateConfig
from shardsmith.pipelines.core.lifecycle import RunSpec, run_job
from shardsmith.pipelines.flows.curate_images import duplicate_keys_across_shards, run_images, url_stage
from shardsmith.pipelines.flows.download import retry_failed
from shardsmith.pipelines.formats.embeddings import PARTS as EMBEDDING_PARTS

CURATE_PARTS = ("scores", "curated", *EMBEDDING_PARTS, "downloaded")
FIELDS_WITHOUT_SCORES = set(BASE_RANGES) | {"caption", "url", "key"}


def check_rules_against_scores(cfg: CurateConfig, mode: str, spec: ScorerSpec) -> None:
    """Every field a rule reads must be a score this run computes, or a field every row has."""
    if mode not in ("images", "urls"):
        return
    computed = set(spec.computed())
    for rule in cfg.ruleset().rules:
        for need in rule.needs():
            if need in spec.scores and need not in computed:
                s = spec.scores[need]
                how = (f"give {s.flag}" if s.flag else f"give heads.{need}.weights") if s.arch else \
                    f"enable {need} (on by default; drop --no-similarity)"
                raise ConfigError(f"rule '{rule.name}' needs the {need!r} score, which is not computed: {how}, "
                                  "or choose a preset/rules without it (--preset none --rule ...)")
            if need not in spec.scores and need not in FIELDS_WITHOUT_SCORES:
                raise ConfigError(f"rule '{rule.name}': unknown field {need!r}; fields: "
                                  f"{', '.join(spec.scores.names + sorted(FIELDS_WITHOUT_SCORES))}")


def plan_curate(cfg: CurateConfig):
    """(mode, shards): INPUT as a checked list of shards."""
    from shardsmith.pipelines.formats.inputs import plan_shards, plan_url_shards

    if cfg.mode == "urls":  # LAION metadata -> fetched images -> the images pipeline
        return "urls", plan_url_shards(cfg.input, cfg.urls_per_shard)
    return plan_shards(cfg.input, cfg.mode, required_columns=cfg.ruleset().needs())


def run_curate(cfg: CurateConfig, log=print) -> dict:
    """Plan, validate, run and commit; returns the run's stats (also written to stats.json)."""
    cfg.validate()
    rules = cfg.ruleset()
    mode, shards = plan_curate(cfg)
    spec = ScorerSpec(ClipSpec(cfg.clip_model, cfg.clip_pretrained), cfg.head_specs(), cfg.similarity,
                      cfg.score_set(), cfg.precision, cfg.compile)
    check_rules_against_scores(cfg, mode, spec)
    scorer, models = None, {}
    fingerprint = {**cfg.fingerprint(), "mode": mode}
    if mode in ("images", "urls"):
        # Named predictors: fetched once into this machine's cache and verified here, before any
        # work; the run records (and its actors then require) the hashes verified.
        spec = dataclasses.replace(spec, heads=pin_heads(spec.heads, log))
        warn_predictor_clip(spec, log)
        if "predictors" in fingerprint:
            fingerprint["predictors"] = {h.predictor.name: {**fingerprint["predictors"][h.predictor.name],
                                                            "sha256": h.predictor.sha256}
                                         for h in spec.heads.values() if h.predictor is not None}
        # Check the model and the heads here, so that a bad one fails before any work starts: the
        # CLIP model is built on the meta device (architecture, checkpoint keys and shapes,
        # preprocessing; no weights in memory), the heads are loaded for real; the actors load all.
        scorer = Scorer(spec, device="meta")
        models = {"clip_model": cfg.clip_model, "clip_pretrained": cfg.clip_pretrained,
                  "embed_dim": scorer.embedder.embed_dim,
                  "heads": {n: h.to_dict() for n, h in spec.heads.items()}, "scores": spec.scores.to_list(),
                  "computed": spec.computed(), "not_computed": spec.not_computed()}
    by_name = {s.name: s for s in shards}

    def execute(todo: list[str]) -> None:
        shards_todo = [by_name[n] for n in todo]
        if mode == "images":
            run_images(cfg, shards_todo, rules, spec, scorer, log)
        elif mode == "urls":
            run_images(cfg, shards_todo, rules, spec, scorer, log, **url_stage(cfg, shards_todo, rules))
        else:
            run_metadata(cfg, shards_todo, rules)

    def extra_stats(stats: dict, layout, log) -> dict:
        extra = {}
        if mode == "images":
            dup = extra["duplicate_keys_across_shards"] = duplicate_keys_across_shards(cfg.output, list(by_name))
            if dup["count"]:
                log(f"warning: {dup['count']} key(s) appear in more than one shard, e.g. "
                    f"{[d['key'] for d in dup['examples'][:3]]} (each shard's rows are still accounted for; "
                    "see stats.json duplicate_keys_across_shards)")
        used = sorted({p for e in stats["shards"].values() for p in e.get("precision", [])})
        return {**extra, "mode": mode, "rules": rules.names, "scores_computed": models.get("computed", []),
                "scores_not_computed": models.get("not_computed", []), **({"precision": used} if used else {})}

    missing = models.get("not_computed")
    run = RunSpec(
        tool="curate", output=cfg.output, shards=list(by_name), fingerprint=fingerprint,
        config=cfg.to_dict(), models=models, inputs=[s.to_dict() for s in shards],
        what=f"{len(shards)} shard(s) in {cfg.input} ({mode} mode)", parts=CURATE_PARTS, overwrite=cfg.overwrite,
        address=cfg.address,
        notes=[f"rules: {', '.join(rules.names) or '(none: keep every readable row)'}"]
        + ([f"not computed (no weights given, column left null): {', '.join(missing)}"] if missing else []),
        redo=retry_failed(cfg, list(by_name)) if mode == "urls" else None,
        redo_what=f"failures to retry: {', '.join(cfg.retry_kinds)}", extra_stats=extra_stats,
        models_used=lambda stats: {"precision_used": stats["precision"]} if "precision" in stats else {},
        summary_title=f"\ncurate summary ({mode} mode, {len(shards)} shards)",
        summary_notes=([f"\nnot computed (null columns): {', '.join(missing)}"] if missing else [])
        + [f"\noutputs in {cfg.output}: scores/, curated/, stats.json, manifest.json"],
        after=report_after if cfg.report else None, lock_ttl=cfg.lock_ttl, break_lock=cfg.break_lock)
    return run_job(run, execute, log)


def warn_predictor_clip(spec: ScorerSpec, log) -> None:
    """A predictor made for another CLIP model's embeddings gives meaningless scores even when the
    widths agree (ViT-L-14 vs ViT-L-14-quickgelu): say so."""
    ours = clip_name(spec.clip.model, spec.clip.pretrained)
    for name, h in spec.heads.items():
        p = h.predictor
        if p is not None and p.clip and p.clip != ours:
            log(f"warning: head {name!r}: predictor {p.name} reads {p.clip} embeddings, this run's CLIP is {ours}: "
                "its scores will not mean what they mean in LAION's data")


def report_after(output: str, log) -> None:
    from shardsmith.pipelines.report import report_after_run

    report_after_run(output, log=log)  # a failure is a warning: the data is committed


def run_metadata(cfg: CurateConfig, todo: list, rules) -> None:
    """One Ray task per metadata file, a window of them in flight. Plain tasks, not a Ray Data
    dataset: each file is one independent unit with no data passed between stages, and Ray Data's
    executor added about a second to a run of a few files (bench/metadata_filter.py)."""
    import ray

    from shardsmith.pipelines.core.dispatch import Dispatcher, progress_on_commit
    from shardsmith.pipelines.core.progress import Progress
    from shardsmith.pipelines.core.resources import cluster_resources
    from shardsmith.pipelines.sinks.metadata import filter_metadata_shard

    progress = Progress("curate", None, len(todo), enabled=cfg.progress)
    # One CPU per file: the work is CPU-bound, and on a 2-CPU node two tasks of half a CPU each
    # beyond the first two start worker processes that Ray reaps when idle (restarted next run).
    task = ray.remote(num_cpus=1, max_retries=3)(filter_metadata_shard)  # each file commits atomically
    dispatcher = Dispatcher(max(4, int(4 * cluster_resources()[0])), progress_on_commit(progress), cfg.stall_timeout,
                            stage="metadata filter")
    for shard in todo:
        dispatcher.submit(task.remote(shard, rules, cfg.output), tag=0, name=shard.name)
    dispatcher.drain(poll_every=1.0)
    progress.close()
