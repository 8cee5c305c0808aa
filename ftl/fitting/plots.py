"""Evaluation pictures whose size does not depend on the number of classes.

A picture of the whole confusion matrix is drawn only for a few classes: at 1,000 classes a
readable one would be a 50,000-pixel canvas (about 10 GB), which is what used to kill runs
after training. Past that, the matrix is logged as data (`evaluate.confusion_cells`) and the
pictures show what a reader can take in: the most-confused pairs and the sorted per-class
accuracy. Every figure is at most MAX_INCHES × DPI pixels on a side. The sweep's layer curve is
here too.
"""

from __future__ import annotations

import numpy as np

from ftl.fitting import evaluate

DPI = 100
MAX_INCHES = 16.0  # so no picture exceeds 1,600 pixels on a side
MATRIX_CLASSES = 40  # the full matrix is drawn up to this many classes
LABELLED_CLASSES = 30  # tick labels and counts in the cells up to this many
PAIRS = 25  # most-confused pairs shown
BARS = 40  # per-class accuracy as named bars up to this many classes; a sorted curve past it
MAX_SIDE_PX = int(MAX_INCHES * DPI)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
    return path


def inches(n: int, *, per: float, base: float) -> float:
    return min(MAX_INCHES, max(4.0, per * n + base))


def confusion_png(o: evaluate.Outcome, names: list[str], path: str, *, title: str) -> str | None:
    """Row-normalised confusion matrix, with counts for few classes; None past MATRIX_CLASSES."""
    if o.classes > MATRIX_CLASSES:
        return None
    cm = evaluate.confusion(o)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = inches(len(names), per=0.5, base=2)
    fig, ax = pyplot().subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= LABELLED_CLASSES:
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return save(fig, path)


def confused_pairs_png(o: evaluate.Outcome, names: list[str], path: str, *, title: str) -> str | None:
    """The PAIRS most frequent (true → predicted) errors as bars; None when there is no error."""
    pairs = evaluate.confused_pairs(o, names, top=PAIRS)
    if not pairs:
        return None
    fig, ax = pyplot().subplots(figsize=(9, inches(len(pairs), per=0.3, base=1.5)))
    labels = [f"{t[:28]} → {p[:28]}" for t, p, _, _ in pairs]
    counts = [n for _, _, n, _ in pairs]
    ax.barh(range(len(pairs)), counts, color="tab:red")
    ax.set_yticks(range(len(pairs)), labels, fontsize=8)
    ax.invert_yaxis()  # the most frequent on top
    for i, (_, _, n, share) in enumerate(pairs):
        ax.annotate(f"{share:.0%} of its class", (n, i), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=7)
    ax.xaxis.get_major_locator().set_params(integer=True)  # counts of rows
    ax.set_xlabel("rows")
    ax.set_title(f"{title}: the {len(pairs)} most-confused pairs (true → predicted)")
    return save(fig, path)


def per_class_png(o: evaluate.Outcome, names: list[str], path: str, *, title: str) -> str:
    """Per-class accuracy (recall), sorted: named bars for a few classes, a curve with the worst named for many."""
    pc = evaluate.per_class(o)
    present = np.flatnonzero(pc["support"] > 0)
    order = present[np.argsort(pc["recall"][present], kind="stable")]
    recall = pc["recall"][order]
    if len(order) <= BARS:
        fig, ax = pyplot().subplots(figsize=(7, inches(len(order), per=0.25, base=1.5)))
        ax.barh(range(len(order)), recall, color="tab:blue")
        ax.set_yticks(range(len(order)), [names[i][:30] for i in order], fontsize=8)
        ax.invert_yaxis()  # the worst on top
        ax.set_xlim(0, 1)
        ax.set_xlabel("accuracy (recall)")
    else:
        fig, ax = pyplot().subplots(figsize=(10, 5))
        ax.plot(np.arange(1, len(order) + 1), recall, color="tab:blue")
        ax.fill_between(np.arange(1, len(order) + 1), recall, alpha=0.2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("class, worst → best")
        ax.set_ylabel("accuracy (recall)")
        worst = "\n".join(f"{names[i][:30]}  {r:.2f}" for i, r in zip(order[:10], recall[:10]))
        ax.text(0.02, 0.97, "worst:\n" + worst, transform=ax.transAxes, va="top", fontsize=7, family="monospace",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    mean = recall.mean() if len(recall) else 0.0
    ax.set_title(f"{title}: per-class accuracy of {len(order)} classes, sorted (mean {mean:.3f})")
    return save(fig, path)


def layer_curve_png(curves: dict[tuple[str, str], dict[str, float]], path: str) -> str:
    """Best val accuracy per layer, one panel per (backbone, weights), the layers by name in depth order."""
    # A panel each: backbones have different layers, so no one x-axis of names fits them all.
    n = len(curves)
    fig, axes = pyplot().subplots(1, n, figsize=(min(MAX_INCHES, 1 + 5 * n), 4.5), sharey=True, squeeze=False)
    for ax, ((backbone, weights), layers) in zip(axes[0], curves.items()):
        names, accs = list(layers), list(layers.values())
        ax.plot(range(len(names)), accs, marker="o")
        for x, acc in enumerate(accs):
            ax.annotate(f"{acc:.3f}", (x, acc), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4
                      else "center", fontsize=8)
        ax.set_xlabel(f"{backbone} ({weights}) layer, early → late")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best val accuracy over the grid")
    fig.suptitle("which layer? validation accuracy per layer")
    return save(fig, path)
