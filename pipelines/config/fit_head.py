"""``fit-head``: what a fit is asked to do, validated before any work."""

from __future__ import annotations

from dataclasses import dataclass, field

from shardsmith.errors import ConfigError
from shardsmith.filters.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED
from shardsmith.filters.fit import TASKS


@dataclass
class FitHeadConfig:
    output: str = ""  # OUTPUT_HEAD: the safetensors head; OUTPUT_HEAD.json its card
    run: str | None = None  # a curate OUTPUT written with --embeddings (clip-retrieval layout)
    labels: str | None = None  # parquet/csv table of key, label (required with run)
    images: str | None = None  # or: labelled webdataset shards / label folders, embedded on the fly
    label_field: str = "label"  # --images shards: KEY.cls, KEY.label, or this field of KEY.json
    task: str = "binary"  # binary -> probability head; regression -> mlp head
    folds: int = 5
    hidden: list[int] = field(default_factory=list)  # empty: logistic regression / LAION's aesthetic MLP
    epochs: int = 0  # 0: the task's default
    seed: int = 0
    clip_model: str = DEFAULT_MODEL  # --images: the CLIP model to embed with
    clip_pretrained: str | None = DEFAULT_PRETRAINED
    work: str | None = None  # --images: where the embeddings go (default OUTPUT_HEAD.embeddings)
    batch_size: int = 64
    device: str = "auto"
    num_actors: int = 0
    address: str | None = None
    progress: bool = True

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("OUTPUT_HEAD: the file to write the head to is required")
        if self.images:
            if self.run:
                raise ConfigError("give either RUN LABELS (stored embeddings) or --images, not both")
        elif not (self.run and self.labels):
            raise ConfigError("RUN and LABELS are required (or --images DIR_OR_SHARDS [LABELS])")
        if self.task not in TASKS:
            raise ConfigError(f"--task: {self.task!r} is not one of {', '.join(TASKS)}")
        if not 2 <= self.folds <= 100:
            raise ConfigError(f"--folds: must be in [2, 100], got {self.folds}")
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"--hidden: layer sizes must be >= 1, got {self.hidden}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError("--epochs must be >= 0 and --batch-size >= 1")
        if not self.label_field:
            raise ConfigError("--label-field: a field name is required")

    @property
    def arch(self) -> str:
        return "probability" if self.task == "binary" else "mlp"
