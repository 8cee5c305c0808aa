"""Classification metrics, a per-class report and a confusion-matrix plot, from probabilities."""

from __future__ import annotations

import numpy as np
import torch


def predict_proba(head: torch.nn.Module, x: np.ndarray, *, batch_size: int = 8192) -> np.ndarray:
    head.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(torch.softmax(head(torch.from_numpy(x[i : i + batch_size])), dim=1).numpy())
    return np.concatenate(out)


def confusion(y: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted."""
    return np.bincount(y * classes + pred, minlength=classes * classes).reshape(classes, classes)


def metrics(proba: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """accuracy, top-5 (for 5+ classes), macro-F1, mean per-class accuracy and log loss."""
    classes = proba.shape[1]
    pred = proba.argmax(1)
    cm = confusion(y, pred, classes)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    present = support > 0
    out = {
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(f1[present].mean()),
        "mean_per_class_accuracy": float(recall[present].mean()),
        "log_loss": float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0)).mean()),
    }
    if classes >= 5:
        top5 = np.argsort(-proba, axis=1)[:, :5]
        out["top5_accuracy"] = float((top5 == y[:, None]).any(1).mean())
    return out


def report(proba: np.ndarray, y: np.ndarray, names: list[str]) -> str:
    """Per-class precision, recall, F1 and support, as a fixed-width text table."""
    cm = confusion(y, proba.argmax(1), len(names))
    lines = [f"{'class':<24} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"]
    for i, name in enumerate(names):
        tp, predicted, support = cm[i, i], cm[:, i].sum(), cm[i].sum()
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        lines.append(f"{name:<24} {p:>9.3f} {r:>9.3f} {f:>9.3f} {support:>9d}")
    lines.append(f"{'accuracy':<24} {'':>9} {'':>9} {np.trace(cm) / cm.sum():>9.3f} {cm.sum():>9d}")
    return "\n".join(lines) + "\n"


def confusion_png(proba: np.ndarray, y: np.ndarray, names: list[str], path: str, *, title: str) -> str:
    """Row-normalised confusion matrix with counts, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion(y, proba.argmax(1), len(names))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(5.0, 0.5 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 30:
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(names)):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
