"""Fitting heads on labelled CLIP embeddings, the way LAION built its predictors (plain torch/numpy).

- binary labels (0/1) -> a ``probability`` head: logistic regression on the L2-normalised
  embedding (or one hidden ReLU layer), sigmoid output; metrics AUC and accuracy at 0.5;
- real-valued labels -> an ``mlp`` head, the shape of LAION's aesthetic predictor
  (D -> 1024 -> 128 -> 64 -> 16 -> 1, ReLU between), trained with MSE; metrics MSE and Spearman.

``cross_validate`` fits one head per fold on the other folds and scores the held-out one (folds
stratified by label for binary tasks, shuffled with a seed; rows of one group -- an image and its
synthetic watermarked copy -- always in the same fold): the metrics are held-out ones,
averaged over folds, and every row gets one held-out score. ``fit_head`` then fits the head that
is written on all rows. Full-batch Adam, a fixed number of epochs, seeded: the same data gives the
same head. Up to 4096 rows each epoch is one full-batch step; larger sets take shuffled
minibatches of 1024 (so set fewer --epochs for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from shardsmith.filters.heads import MLPHead, ProbabilityHead

TASKS = ("binary", "regression")
FULL_BATCH = 4096  # up to this many rows, one step per epoch on all of them; beyond, shuffled minibatches
MINI_BATCH = 1024
REGRESSION_HIDDEN = (1024, 128, 64, 16)  # LAION's aesthetic predictor


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney U statistic, ties counted half)."""
    y = np.asarray(labels) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = _ranks(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(labels) > 0.5
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    tp = np.concatenate([[0], np.cumsum(y[order])])
    fp = np.concatenate([[0], np.cumsum(~y[order])])
    return fp / max(1, (~y).sum()), tp / max(1, y.sum())


def metrics(task: str, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    if task == "binary":
        return {"auc": auc(labels, scores), "accuracy": float(np.mean((scores > 0.5) == (labels > 0.5)))}
    return {"mse": float(np.mean((scores - labels) ** 2)), "spearman": spearman(labels, scores)}


def folds(labels: np.ndarray, k: int, task: str, seed: int = 0, groups: list | None = None) -> list[np.ndarray]:
    """``k`` disjoint index arrays covering every row; stratified by label for binary tasks. With
    ``groups``, rows of one group stay in one fold (a watermarked image and its clean original must
    not be split between training and held-out rows: their embeddings are near twins)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if groups is not None:
        members: dict = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        order = list(members.values())
        rng.shuffle(order)
        out_g: list[list[int]] = [[] for _ in range(k)]
        pos = [0] * k
        for rows in sorted(order, key=len, reverse=True):  # biggest first, each to the emptiest fold
            p = int(sum(labels[r] > 0.5 for r in rows)) if task == "binary" else 0
            j = min(range(k), key=lambda f: (len(out_g[f]), pos[f] if p else -pos[f]))
            out_g[j].extend(rows)
            pos[j] += p
        return [np.sort(np.array(f, dtype=np.int64)) for f in out_g]
    if task == "binary":
        out: list[list[int]] = [[] for _ in range(k)]
        for cls in (0, 1):
            idx = np.flatnonzero((labels > 0.5) == bool(cls))
            rng.shuffle(idx)
            for i, j in enumerate(idx):
                out[i % k].append(int(j))
        return [np.sort(np.array(f, dtype=np.int64)) for f in out]
    idx = rng.permutation(n)
    return [np.sort(part) for part in np.array_split(idx, k)]


@dataclass
class FitOptions:
    task: str = "binary"
    hidden: tuple[int, ...] = ()  # binary: () = logistic regression; regression default REGRESSION_HIDDEN
    epochs: int = 0  # 0: the task's default (300 binary, 500 regression)
    lr: float = 0.0  # 0: the task's default (0.05 logistic, 0.01 with hidden layers, 1e-3 regression)
    weight_decay: float = 1e-4
    seed: int = 0

    def resolved(self) -> "FitOptions":
        hidden = tuple(self.hidden) if self.hidden or self.task == "binary" else REGRESSION_HIDDEN
        epochs = self.epochs or (300 if self.task == "binary" else 500)
        lr = self.lr or (1e-3 if self.task == "regression" else (0.01 if hidden else 0.05))
        return FitOptions(self.task, hidden, epochs, lr, self.weight_decay, self.seed)


def train(x: np.ndarray, y: np.ndarray, opts: FitOptions) -> nn.Module:
    """One head fitted on (x, y): a ProbabilityHead (binary) or an MLPHead (regression)."""
    o = opts.resolved()
    g = torch.Generator().manual_seed(o.seed)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    sizes = [xt.shape[1], *o.hidden, 1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        head = (ProbabilityHead if o.task == "binary" else MLPHead)(sizes)
    if o.task == "regression":  # start at the labels' mean: fewer epochs to a useful fit
        with torch.no_grad():
            head.layers[-1].bias.fill_(float(yt.mean()))
    opt = torch.optim.Adam(head.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    head.train()
    n = len(yt)
    batch = n if n <= FULL_BATCH else MINI_BATCH
    for _ in range(o.epochs):
        order = torch.randperm(n, generator=g) if batch < n else None
        for start in range(0, n, batch):
            idx = order[start:start + batch] if order is not None else slice(None)
            opt.zero_grad()
            out = head.layers(xt[idx]).squeeze(-1)
            loss = (nn.functional.binary_cross_entropy_with_logits(out, yt[idx]) if o.task == "binary"
                    else nn.functional.mse_loss(out, yt[idx]))
            loss.backward()
            opt.step()
    return head.eval()


@dataclass
class FitResult:
    """What tiny-models' toy watermark head fit returns."""

    head: ProbabilityHead
    train_accuracy: float


def fit_probability_head(
    embeddings: np.ndarray, labels: np.ndarray, hidden: int = 0, epochs: int = 300, seed: int = 0
) -> FitResult:
    """Fit a probability head on labelled (already normalised) embeddings, every row used for
    training (tiny-models' toy watermark head; fit-head uses ``fit_head``, with held-out folds)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32)
    sizes = [x.shape[1], hidden, 1] if hidden else [x.shape[1], 1]
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    head = ProbabilityHead(sizes)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(epochs):
        opt.zero_grad()
        logits = head.layers(x).squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float(((head(x) > 0.5).float() == y).float().mean())
    return FitResult(head.eval(), acc)


def predict(head: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return head(torch.as_tensor(x, dtype=torch.float32)).float().numpy()


@dataclass
class FitReport:
    head: nn.Module  # fitted on every row
    task: str
    metrics: dict[str, float]  # held-out, averaged over folds
    per_fold: list[dict] = field(default_factory=list)
    held_out: np.ndarray | None = None  # each row's score from the head that did not see it
    train_metrics: dict[str, float] = field(default_factory=dict)  # the final head on its own training rows
    options: FitOptions | None = None


def cross_validate(x: np.ndarray, y: np.ndarray, k: int, opts: FitOptions, groups: list | None = None
                   ) -> tuple[dict, list[dict], np.ndarray]:
    held = np.full(len(y), np.nan, dtype=np.float32)
    per_fold = []
    for i, test in enumerate(folds(y, k, opts.task, opts.seed, groups)):
        train_idx = np.setdiff1d(np.arange(len(y)), test)
        head = train(x[train_idx], y[train_idx], FitOptions(**{**opts.__dict__, "seed": opts.seed + i}))
        held[test] = predict(head, x[test])
        per_fold.append({"fold": i, "rows": int(len(test)), **metrics(opts.task, y[test], held[test])})
    names = [m for m in per_fold[0] if m not in ("fold", "rows")]
    avg = {m: float(np.nanmean([f[m] for f in per_fold])) for m in names}
    return avg, per_fold, held


def fit_head(x: np.ndarray, y: np.ndarray, k: int = 5, opts: FitOptions | None = None,
             groups: list | None = None) -> FitReport:
    """k-fold held-out metrics (``groups`` kept within folds), then the head fitted on every row."""
    opts = (opts or FitOptions()).resolved()
    avg, per_fold, held = cross_validate(x, y, k, opts, groups)
    head = train(x, y, opts)
    return FitReport(head, opts.task, avg, per_fold, held, metrics(opts.task, y, predict(head, x)), opts)
