"""Classification metrics and per-class tables, reduced batch by batch from a head's outputs.

Nothing here holds an (rows × classes) array beyond one batch: each row is reduced to its
predicted class, the log-probability of its true class and how many classes outrank it, and
every metric (top-k included) comes from those. At 1,000 classes and 100k rows the full
probabilities alone would be 400 MB, and sorting them for top-5 several times that. The
confusion matrix is kept as its non-zero cells, so it grows with rows, not with classes².
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

TOP_K = (5,)  # top-k accuracy is reported for each k below the number of classes
BATCH_ROWS = 8192
REPORT_ROWS = 50  # classes listed in the text report; the CSV has them all
LOG_FLOOR = math.log(1e-15)  # log loss clips probabilities as scikit-learn does


@dataclass
class Outcome:
    """Per row: true class, predicted class, log-probability of the truth, classes scored above the truth."""

    y: np.ndarray
    pred: np.ndarray
    log_true: np.ndarray
    rank: np.ndarray
    classes: int


def reduce(scores: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax and the rank of the true class (0: top) of one batch of scores."""
    truth = scores.gather(1, y[:, None])
    return scores.argmax(1), (scores > truth).sum(1)


def outcome(head: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = BATCH_ROWS) -> Outcome:
    """The head's outcome on (x, y), one batch of logits at a time."""
    head.eval()
    parts, width = [], 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            yb = torch.from_numpy(y[i : i + batch_size])
            logp = torch.log_softmax(head(torch.from_numpy(x[i : i + batch_size])), dim=1)
            pred, rank = reduce(logp, yb)
            parts.append((pred, logp.gather(1, yb[:, None])[:, 0], rank))
            width = logp.shape[1]
    return join(parts, y, classes=width)


def from_proba(proba: np.ndarray, y: np.ndarray, *, batch_size: int = BATCH_ROWS) -> Outcome:
    """The outcome of probabilities already computed (by another library, or in a test)."""
    parts = []
    for i in range(0, len(y), batch_size):
        p, yb = torch.from_numpy(proba[i : i + batch_size]), torch.from_numpy(y[i : i + batch_size])
        pred, rank = reduce(p, yb)
        parts.append((pred, torch.log(p.gather(1, yb[:, None])[:, 0].double()), rank))
    return join(parts, y, classes=proba.shape[1])


def join(parts: list, y: np.ndarray, *, classes: int) -> Outcome:
    cat = [np.concatenate([p[k].numpy() for p in parts]) if parts else np.zeros(0) for k in range(3)]
    return Outcome(y=y, pred=cat[0].astype(np.int64), log_true=cat[1].astype(np.float64),
                   rank=cat[2].astype(np.int64), classes=classes)


def per_class(o: Outcome) -> dict[str, np.ndarray]:
    """Support, predicted count, precision, recall (per-class accuracy) and F1 of every class."""
    c = o.classes
    support = np.bincount(o.y, minlength=c)
    predicted = np.bincount(o.pred, minlength=c)
    tp = np.bincount(o.y[o.pred == o.y], minlength=c).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    return {"support": support, "predicted": predicted, "precision": precision, "recall": recall, "f1": f1}


def metrics(o: Outcome) -> dict[str, float]:
    """accuracy, top-k for each k < classes, macro-F1, mean per-class accuracy and log loss."""
    pc = per_class(o)
    present = pc["support"] > 0
    out = {
        "accuracy": float((o.pred == o.y).mean()),
        "macro_f1": float(pc["f1"][present].mean()),
        "mean_per_class_accuracy": float(pc["recall"][present].mean()),
        "log_loss": float(-np.maximum(o.log_true, LOG_FLOOR).mean()),
    }
    for k in TOP_K:
        if k < o.classes:  # with k ≥ classes every row is a hit: no information
            out[f"top{k}_accuracy"] = float((o.rank < k).mean())
    return out


def confusion_cells(o: Outcome) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-zero cells of the confusion matrix: true class, predicted class, count."""
    codes, counts = np.unique(o.y.astype(np.int64) * o.classes + o.pred, return_counts=True)
    return codes // o.classes, codes % o.classes, counts


def confusion_table(o: Outcome, names: list[str]):
    """The full confusion matrix as data: a DataFrame of its non-zero cells (true, predicted, count)."""
    import pandas as pd

    true, pred, count = confusion_cells(o)
    labels = np.asarray(names, dtype=object)
    return pd.DataFrame({"true": labels[true], "predicted": labels[pred], "count": count})


def confusion(o: Outcome) -> np.ndarray:
    """The dense matrix, rows true and columns predicted: only for a few classes (it is classes² cells)."""
    cm = np.zeros((o.classes, o.classes), dtype=np.int64)
    true, pred, count = confusion_cells(o)
    cm[true, pred] = count
    return cm


def confused_pairs(o: Outcome, names: list[str], *, top: int) -> list[tuple[str, str, int, float]]:
    """The `top` most frequent errors: (true, predicted, count, share of the true class's rows)."""
    true, pred, count = confusion_cells(o)
    wrong = true != pred
    true, pred, count = true[wrong], pred[wrong], count[wrong]
    support = np.bincount(o.y, minlength=o.classes)
    order = np.lexsort((pred, true, -count))[:top]
    return [(names[true[i]], names[pred[i]], int(count[i]), count[i] / support[true[i]]) for i in order]


def per_class_table(o: Outcome, names: list[str]):
    """Every class as a DataFrame row, with the class it is most often mistaken for; worst F1 first."""
    import pandas as pd

    pc = per_class(o)
    true, pred, count = confusion_cells(o)
    wrong = true != pred
    # The largest off-diagonal cell of each row: sort by count, keep each true class's first.
    order = np.lexsort((-count[wrong], true[wrong]))
    t, p, n = true[wrong][order], pred[wrong][order], count[wrong][order]
    first = np.ones(len(t), bool)
    first[1:] = t[1:] != t[:-1]
    mistaken_for, mistaken_count = np.full(o.classes, "", dtype=object), np.zeros(o.classes, np.int64)
    mistaken_for[t[first]] = np.asarray(names, dtype=object)[p[first]]
    mistaken_count[t[first]] = n[first]
    table = pd.DataFrame({"class": names, **pc, "most_mistaken_for": mistaken_for, "mistaken_count": mistaken_count})
    return table.sort_values(["f1", "support", "class"], ascending=[True, False, True], kind="stable")


def report(o: Outcome, names: list[str], *, full_table: str | None = None) -> str:
    """Per-class precision, recall, F1 and support as text: every class when few, else the worst by F1."""
    table = per_class_table(o, names)
    many = len(names) > REPORT_ROWS
    rows = table.head(REPORT_ROWS) if many else table.sort_index()
    lines = [f"{'class':<24} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"]
    for name, p, r, f, n in zip(rows["class"], rows["precision"], rows["recall"], rows["f1"], rows["support"]):
        lines.append(f"{name[:24]:<24} {p:>9.3f} {r:>9.3f} {f:>9.3f} {n:>9d}")
    if many:
        lines.append(f"… {len(names) - REPORT_ROWS} more classes: listed above are the {REPORT_ROWS} of "
                     f"{len(names)} with the lowest F1" + (f"; every class is in {full_table}" if full_table else ""))
    present = table[table["support"] > 0]
    lines.append(f"{'macro avg':<24} {present['precision'].mean():>9.3f} {present['recall'].mean():>9.3f} "
                 f"{present['f1'].mean():>9.3f} {len(o.y):>9d}")
    lines.append(f"{'accuracy':<24} {'':>9} {'':>9} {float((o.pred == o.y).mean()):>9.3f} {len(o.y):>9d}")
    return "\n".join(lines) + "\n"
