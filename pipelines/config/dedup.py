"""``dedup``: what a dedup run is asked to do, validated before any work.

The defaults were measured on planted duplicates (tests/test_dedup.py, README "dedup"): a pHash
Hamming distance of at most 10 carries re-encoded, resized and slightly cropped copies of the test
images while distinct look-alikes stay further apart; the semantic threshold (cosine >= 0.95 on the
L2-normalised CLIP embeddings, epsilon 0.05 in SemDeDup's terms) is meant for real CLIP models and
is not measured here: the tiny random test model puts distinct images at cosine 0.91-0.997, so it
separates nothing at 0.95.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shardsmith.errors import ConfigError

METHODS = ("exact", "phash", "semantic")
KEEP = ("quality", "first-run")


@dataclass
class DedupConfig:
    runs: list[str] = field(default_factory=list)  # curate OUTPUT folders, earlier first
    output: str = ""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    phash_max_distance: int = 10  # Hamming distance of the 64-bit pHashes, <=
    phash_bands: int = 0  # bands the pHash is cut into for bucketing; 0 = distance + 1 (every pair found)
    semantic_min_cosine: float = 0.95  # cosine of the L2-normalised image embeddings, >=
    keep: str = "quality"  # quality: highest aesthetic, then largest original size, then key; first-run
    buckets: int = 0  # hash buckets of the exact/pHash stage (its units); 0 = from the row count
    clusters: int = 0  # k-means clusters (semantic); 0 = about sqrt(rows)
    kmeans_sample: int = 0  # embeddings k-means is fitted on; 0 = min(rows, max(64 k, 10000))
    kmeans_iters: int = 20
    probes: int = 2  # clusters each embedding is compared in: its nearest centroids
    block_rows: int = 4096  # rows of one cluster compared at once; a larger cluster is split in blocks
    seed: int = 0
    address: str | None = None
    overwrite: bool = False
    progress: bool = True
    report: bool = True
    keep_work: bool = False  # keep OUTPUT/_work (the stages' files) after a complete run, for inspection

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "overwrite"}

    def bands(self) -> int:
        return self.phash_bands or min(64, self.phash_max_distance + 1)

    def fingerprint(self) -> dict:
        """What decides the outputs: a rerun into the same OUTPUT must match it to resume."""
        keys = ("runs", "methods", "phash_max_distance", "phash_bands", "semantic_min_cosine", "keep", "buckets",
                "clusters", "kmeans_sample", "kmeans_iters", "probes", "block_rows", "seed")
        return {k: getattr(self, k) for k in keys}

    def auto_buckets(self, rows: int) -> int:
        """About 2 M bucket rows per task (each row is in 1 exact + ``bands`` pHash buckets)."""
        if self.buckets:
            return self.buckets
        keys = rows * (("exact" in self.methods) + ("phash" in self.methods) * self.bands())
        return max(4, min(65536, math.ceil(keys / 2_000_000)))

    def auto_clusters(self, rows: int) -> int:
        """k ~ sqrt(rows) balances the assignment (rows x k) against the pairwise work in the
        clusters (rows x rows / k)."""
        return max(1, min(rows, self.clusters or round(math.sqrt(max(rows, 1)))))

    def auto_sample(self, rows: int, k: int) -> int:
        return min(rows, self.kmeans_sample or max(64 * k, 10_000))

    def validate(self) -> None:
        if not self.runs:
            raise ConfigError("runs: at least one curate OUTPUT to deduplicate is required")
        if not self.output:
            raise ConfigError("output: an output path or URL is required")
        if len(set(self.runs)) != len(self.runs):
            raise ConfigError(f"runs: a RUN is given twice ({', '.join(self.runs)})")
        if self.output in self.runs:
            raise ConfigError(f"output: {self.output} is also a RUN; write the deduplicated set elsewhere")
        if not self.methods:
            raise ConfigError(f"methods: at least one of {', '.join(METHODS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods: {bad[0] if bad else 'a method is given twice'!r}; known: {', '.join(METHODS)}")
        self.methods = [m for m in METHODS if m in self.methods]  # one canonical order
        if not 0 <= self.phash_max_distance <= 32:
            raise ConfigError(f"phash_max_distance: must be in [0, 32] bits, got {self.phash_max_distance}")
        if not 0 <= self.phash_bands <= 64:
            raise ConfigError(f"phash_bands: must be in [0, 64] (0 = distance + 1), got {self.phash_bands}")
        if not -1.0 <= self.semantic_min_cosine <= 1.0:
            raise ConfigError(f"semantic_min_cosine: must be in [-1, 1], got {self.semantic_min_cosine}")
        if self.keep not in KEEP:
            raise ConfigError(f"keep: {self.keep!r} is not one of {', '.join(KEEP)}")
        for key, lo in (("buckets", 0), ("clusters", 0), ("kmeans_sample", 0), ("kmeans_iters", 1), ("probes", 1),
                        ("block_rows", 2)):
            if getattr(self, key) < lo:
                raise ConfigError(f"{key}: must be >= {lo}, got {getattr(self, key)}")
