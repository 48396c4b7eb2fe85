"""``fit-head``'s report: OUTPUT_HEAD.report.html (self-contained) and its plots as PNG beside it:
held-out metrics per fold, the ROC curve (binary) or predicted vs true (regression), and the
held-out score histograms per label."""

from __future__ import annotations

import numpy as np

from shardsmith.filters.fit import roc_curve
from shardsmith.pipelines.core import fs as fsutil
from shardsmith.pipelines.report import html
from shardsmith.pipelines.report.plots import COLORS, _figure, _png


def roc_png(labels: np.ndarray, scores: np.ndarray, auc: float) -> bytes:
    fpr, tpr = roc_curve(labels, scores)
    fig = _figure(4.8, 4.4)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color=COLORS["kept"], linewidth=2, label=f"held-out ROC (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color=COLORS["error"], linestyle=":", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, held-out scores", loc="left", fontsize=11)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return _png(fig)


def calibration_png(labels: np.ndarray, scores: np.ndarray, spearman: float) -> bytes:
    fig = _figure(4.8, 4.4)
    ax = fig.add_subplot()
    ax.scatter(labels, scores, s=10, alpha=0.6, color=COLORS["rows"], linewidths=0)
    lo, hi = float(min(labels.min(), scores.min())), float(max(labels.max(), scores.max()))
    ax.plot([lo, hi], [lo, hi], color=COLORS["threshold"], linestyle="--", linewidth=1.2, label="predicted = true")
    ax.set_xlabel("label")
    ax.set_ylabel("held-out prediction")
    ax.set_title(f"predicted vs true (Spearman {spearman:.3f})", loc="left", fontsize=11)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return _png(fig)


def histograms_png(labels: np.ndarray, scores: np.ndarray, task: str) -> bytes:
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot()
    if task == "binary":
        groups = [("label 0", scores[labels < 0.5], COLORS["kept"]), ("label 1", scores[labels >= 0.5], COLORS["dropped"])]
        bins = np.linspace(0, 1, 41)
    else:
        q = np.quantile(labels, [0, 1 / 3, 2 / 3, 1])
        groups = [(f"label in [{a:.2g}, {b:.2g}]", scores[(labels >= a) & (labels <= b)], c)
                  for a, b, c in zip(q[:-1], q[1:], (COLORS["kept"], COLORS["rows"], COLORS["dropped"]))]
        bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-9, 41)
    for name, vals, color in groups:
        ax.hist(vals, bins=bins, alpha=0.55, color=color, label=f"{name} ({len(vals)})")
    ax.set_xlabel("held-out score")
    ax.set_ylabel("rows")
    ax.set_title("held-out scores by label", loc="left", fontsize=11)
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def write_fit_report(output: str, card: dict, labels: np.ndarray, held_out: np.ndarray) -> str:
    """Writes OUTPUT.report.html and OUTPUT.report/*.png; returns the HTML's URL."""
    task, m = card["task"], card["metrics"]
    plots = {"hist": histograms_png(labels, held_out, task)}
    if task == "binary":
        plots["roc"] = roc_png(labels, held_out, m["auc"])
    else:
        plots["calibration"] = calibration_png(labels, held_out, m["spearman"])
    for name, png in plots.items():
        fsutil.write_bytes_atomic(fsutil.join(output + ".report", f"{name}.png"), png)
    names = [k for k in card["per_fold"][0] if k not in ("fold", "rows")]
    rows = [[html.esc(f["fold"]), html.esc(f["rows"]), *[html.esc(f"{f[k]:.4f}") for k in names]]
            for f in card["per_fold"]]
    rows.append(["<b>mean</b>", html.esc(sum(f["rows"] for f in card["per_fold"])),
                 *[f"<b>{html.esc(f'{m[k]:.4f}')}</b>" for k in names]])
    data = card["data"]
    facts = [["head", html.esc(f"{card['arch']} ({card['task']}), layers {card['layers']}")],
             ["CLIP", html.esc(f"{card['clip_model']} / {card['clip_pretrained']} ({card['embed_dim']}-d)")],
             ["data", html.esc(", ".join(f"{k}: {v}" for k, v in data.items()))],
             ["fitted", html.esc(card["date"])],
             ["use it", html.esc(card["use"])]]
    sections = [
        html.section("metrics", f"Held-out metrics ({card['folds']}-fold)",
                     html.table(["fold", "rows", *names], rows, num_cols={1, *range(2, 2 + len(names))}),
                     note="each fold's head was fitted on the other folds and scored on this one; the head written "
                          "is fitted on every row"),
        html.section("plots", "Held-out scores", "".join(html.plot_img(p, n) for n, p in plots.items())),
        html.section("card", "The head", html.table(["", ""], facts, header=False)),
    ]
    page = html.page(f"fit-head: {fsutil.join(output)}", f"{card['task']} head, {data.get('rows')} rows",
                     [("metrics", "metrics"), ("plots", "plots"), ("card", "card")], sections)
    url = output + ".report.html"
    fsutil.write_bytes_atomic(url, page.encode())
    return url
