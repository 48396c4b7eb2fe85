"""recurate: a new selection from a finished run's stored scores and embeddings, no image decoded.

    RUN's manifest (score set, fingerprint, inputs, rules) -> check the rules against what RUN
    computed, the new heads against RUN's model and embeddings, RUN's inputs
    -> the run lifecycle (core/lifecycle.py): one Ray task per shard (sinks/recurated.py: scores
    and embeddings in, new columns, the rules, scores/ + curated/ out, ledger commit)
    -> stats, the report; the manifest names RUN as its parent (path, fingerprint)
"""

from __future__ import annotations

from shardsmith.errors import InputError, RunError
from shardsmith.filters.scores import ScoreSet
from shardsmith.pipelines.config.recurate import RecurateConfig
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.core.layout import OutputLayout
from shardsmith.pipelines.core.ledger import Ledger
from shardsmith.pipelines.core.lifecycle import RunSpec, run_job
from shardsmith.pipelines.core.manifest import read_manifest
from shardsmith.pipelines.flows.curate import duplicate_keys_across_shards, report_after
from shardsmith.pipelines.formats.embeddings import EMB_DIR, embedding_shards
from shardsmith.pipelines.formats.inputs import InputShard

TOOLS = ("shardsmith curate", "shardsmith recurate")


def parent_run(run: str) -> dict:
    """RUN's manifest, checked: a finished curate (or recurate) run of images."""
    manifest = read_manifest(run)
    if manifest is None:
        raise InputError(f"{run}: no manifest.json: not the OUTPUT of a shardsmith curate run")
    if manifest.get("tool") not in TOOLS:
        raise InputError(f"{run} is the output of {manifest.get('tool')}; recurate reads curate runs")
    mode = manifest.get("fingerprint", {}).get("mode")
    if mode not in ("images", "urls"):
        raise InputError(f"{run} is a {mode}-mode run: it read no image and stored no embedding; curate its "
                         "inputs again with the new rules (metadata mode costs no more than a recurate)")
    return manifest


def input_shards(run: str, manifest: dict) -> list[InputShard]:
    """RUN's input tars, in plan order (urls mode: the shards it downloaded)."""
    from shardsmith.pipelines.stages.download import DOWNLOADED_DIR, as_input_shard

    out = []
    for i in manifest.get("inputs", []):
        if i.get("kind") == "urls":
            out.append(as_input_shard(fsutil.join(run, DOWNLOADED_DIR), i["name"]))
        else:
            out.append(InputShard(i["name"], i["url"], "tar", i.get("index_url")))
    return out


def embeddings_source(run: str, manifest: dict) -> str | None:
    """Where RUN's embeddings are: RUN itself, or (a recurate of a recurate) its parent's source."""
    if fsutil.exists(fsutil.join(run, EMB_DIR)):
        return run
    return (manifest.get("parent") or {}).get("embeddings")


def run_recurate(cfg: RecurateConfig, log=print) -> dict:
    """Check, run and commit; returns the run's stats (also written to stats.json)."""
    cfg.validate()
    manifest = parent_run(cfg.run)
    shards = input_shards(cfg.run, manifest)
    names = [s.name for s in shards]
    done = Ledger(OutputLayout(cfg.run)).committed()
    if any(n not in done for n in names):
        raise RunError(f"{cfg.run}: {sum(n in done for n in names)} of {len(names)} shards are committed; finish "
                       "RUN first (rerun its curate command to resume)")
    models = manifest.get("models") or {}
    run_fp, run_rules = manifest.get("fingerprint", {}), manifest.get("fingerprint", {}).get("rules", [])
    parent_scores = ScoreSet.from_manifest(manifest)
    scores = ScoreSet(list({**{s.name: s for s in parent_scores}, **{s.name: s for s in cfg.new_scores()}}.values()))
    specs = cfg.head_specs()
    computed = [n for n in scores.names if n in set(models.get("computed", parent_scores.names)) | set(specs)]
    rules = cfg.ruleset(scores, run_rules)
    cfg.check_fields(rules, scores, set(computed))
    emb_src = embeddings_source(cfg.run, manifest)
    bounds = {}
    if specs:
        from shardsmith.filters.stored import fp16_bound, load_stored_head

        have = set(embedding_shards(emb_src)) if emb_src else set()
        if not have:
            raise InputError(f"{cfg.run} has no embeddings ({EMB_DIR}/): its curate ran without --embeddings, and "
                             f"the heads {', '.join(specs)} are computed from them; rerun curate with --embeddings")
        if any(n not in have for n in names):
            raise InputError(f"{emb_src}/{EMB_DIR}: no embeddings of shard(s) "
                             f"{', '.join(n for n in names if n not in have)[:200]}")
        for name, spec in specs.items():  # weights, arch and width against RUN's model, before any work
            bounds[name] = fp16_bound(load_stored_head(name, spec, int(models.get("embed_dim") or 0)))
    for s in shards:
        if not fsutil.exists(s.url):
            raise InputError(f"{s.url}: RUN's input shard {s.name} is no longer readable (not found); recurate "
                             "copies the kept samples from RUN's inputs")
    by_name = {s.name: s for s in shards}
    mode = run_fp.get("mode")

    def execute(todo: list[str]) -> None:
        import ray

        from shardsmith.pipelines.core.dispatch import Dispatcher, progress_on_commit
        from shardsmith.pipelines.core.progress import Progress
        from shardsmith.pipelines.core.resources import cluster_resources
        from shardsmith.pipelines.sinks.recurated import recurate_shard

        progress = Progress("recurate", sum(done[n]["rows_read"] for n in todo), len(todo), enabled=cfg.progress)
        task = ray.remote(num_cpus=1, max_retries=3)(recurate_shard)  # each shard commits atomically
        dispatcher = Dispatcher(max(4, 2 * int(cluster_resources()[0])), progress_on_commit(progress))
        for name in todo:
            dispatcher.submit(task.remote(by_name[name], cfg.run, cfg.output, rules, scores.names, specs, emb_src,
                                          int(models.get("embed_dim") or 0)), tag=0)
        dispatcher.drain(poll_every=1.0)
        progress.close()

    def extra_stats(stats: dict, layout, log) -> dict:
        return {"duplicate_keys_across_shards": duplicate_keys_across_shards(cfg.output, names), "mode": mode,
                "rules": rules.names, "scores_computed": computed,
                "scores_not_computed": [n for n in scores.names if n not in computed], "parent": cfg.run}

    heads_doc = {n: {**specs[n].to_dict(), "from": "stored fp16 embeddings", "fp16_bound": bounds[n]} for n in specs}
    out_models = {**models, "scores": scores.to_list(), "computed": computed,
                  "not_computed": [n for n in scores.names if n not in computed],
                  "heads": {**models.get("heads", {}), **{n: specs[n].to_dict() for n in specs}},
                  "heads_from_embeddings": {**models.get("heads_from_embeddings", {}), **heads_doc}}
    parent = {"run": cfg.run, "tool": manifest.get("tool"), "fingerprint": run_fp,
              "finished_at": manifest.get("finished_at"), "embeddings": emb_src}
    rules_note = "RUN's rules" if cfg.inherits_rules() else "rules"
    run = RunSpec(
        tool="recurate", output=cfg.output, shards=names,
        fingerprint={**cfg.fingerprint(run_fp, run_rules), "mode": mode},
        config=cfg.to_dict(), models=out_models, inputs=[s.to_dict() for s in shards], parent=parent,
        what=f"{len(names)} shard(s) of {cfg.run} ({mode} mode), from its scores"
             + (" and embeddings" if specs else "") + "; no image decoded",
        parts=("scores", "curated"), overwrite=cfg.overwrite, address=cfg.address,
        notes=[f"{rules_note}: {', '.join(rules.names) or '(none: keep every readable row)'}"]
        + [f"head {n} from the stored fp16 embeddings (within {bounds[n]:.2g} of a full-pipeline score)" for n in specs],
        extra_stats=extra_stats, summary_title=f"\nrecurate summary ({len(names)} shards of {cfg.run})",
        summary_notes=[f"\noutputs in {cfg.output}: scores/, curated/, stats.json, manifest.json (parent: {cfg.run})"],
        after=report_after if cfg.report else None)
    return run_job(run, execute, log)
