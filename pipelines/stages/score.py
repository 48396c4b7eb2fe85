"""The score stage (actor pool): one CLIP image forward (and one text forward) per sample feeds
every head of the run.

Reads DECODED columns (``stages/batch.py``) -- or, on CPU nodes, SAMPLE columns, decoding the
images itself between forwards in a thread pool (``decode_kwargs``; see ``core/resources.py``
for why) -- and writes SCORED ones: the pixel columns replaced by one
float32 column per score of the run's ScoreSet (NaN where not computed, and for rows that were
errors before scoring), ``node_id``, ``scorer`` (one id per actor process), ``precision`` (what the
towers ran in, resolved per actor from ``auto``), and ``embedding``
(fp16) with ``--embeddings``. Resources: one GPU per actor where the cluster has GPUs, fractional
CPUs otherwise (``core/resources.py``); the model is loaded once per actor.
"""

from __future__ import annotations

import os

import numpy as np

from shardsmith.filters.scorer import Scorer, ScorerSpec
from shardsmith.pipelines.core.resources import node_id
from shardsmith.pipelines.stages.batch import SENTINEL, is_pixel_column, text, text_columns


class ScoreStage:
    """Ray Data UDF (actor pool): the model is loaded once per actor, the run's scores computed."""

    def __init__(self, spec: ScorerSpec, device: str, threads: int, keep_embeddings: bool, batch_size: int,
                 decode_kwargs: dict | None = None):
        import torch

        torch.set_num_threads(threads)
        self.scorer = Scorer(spec, device=device)
        self.decode_kwargs = decode_kwargs
        self.pool = None
        if decode_kwargs is not None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self.batch_size = batch_size
        self.keep_embeddings = keep_embeddings
        self.node_id = node_id()
        # One id per actor process: a restarted actor (after a crash) shows up as a new one.
        self.instance = f"{self.node_id[:12]}-{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        if self.decode_kwargs is not None and "image" in batch:
            from shardsmith.pipelines.stages.decode import decode_batch

            batch = decode_batch(batch, **self.decode_kwargs, pool=self.pool)
        n = len(batch["row"])
        ok = np.array([batch["row"][i] != SENTINEL and text(batch["error_kind"][i]) is None for i in range(n)],
                      dtype=bool)
        scores = {name: np.full(n, np.nan, dtype=np.float32) for name in self.scorer.spec.scores.names}
        emb = None
        if ok.any():
            captions = [c if isinstance(c, str) else "" for c in batch["caption"][ok]]
            inputs = {c: batch[c][ok] for c in self.scorer.spec.pixel_inputs()}
            res = self.scorer.score(batch["pixels"][ok], captions, fixed_batch=self.batch_size, inputs=inputs)
            for name in scores:
                if name in res:
                    scores[name][ok] = res[name]
            if self.keep_embeddings:
                emb = np.zeros((n, res["embedding"].shape[1]), dtype=np.float16)
                emb[ok] = res["embedding"].astype(np.float16)
        out = {k: v for k, v in batch.items() if not is_pixel_column(k)}
        out.update(scores)
        out["node_id"] = np.array([self.node_id] * n, dtype=object)
        out["scorer"] = np.array([self.instance] * n, dtype=object)
        out["precision"] = np.array([self.scorer.embedder.precision] * n, dtype=object)
        if self.keep_embeddings:
            if emb is None:
                emb = np.zeros((n, self.scorer.embedder.embed_dim), dtype=np.float16)
            out["embedding"] = emb
        return text_columns(out)
