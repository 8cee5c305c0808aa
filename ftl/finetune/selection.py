"""Which fine-tuned candidate replaces the probe: only one that beats it on val by a margin the data supports.

One val split cannot tell two models apart by less than its noise: near 0.98 on 968 images, the
standard error of an accuracy is about 0.45 points, and the best of several candidates × epochs
picked on that split is biased upwards. So the probe, which needs no new version, is the default.
A candidate replaces it only when its paired gain on the same val images (the mean of
correct_candidate − correct_probe per image, a McNemar-style paired comparison) is at least
`margin` paired standard errors (`finetune.margin_se`, 2 by default: a gain that large arises by
chance about 2% of the time). Among the candidates that clear it, the best on val is kept, by the
sweep's rule (accuracy, then the lower loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Choice:
    index: int  # the candidate kept, or when the probe is kept, the best-ranked one (what fine-tuning reached)
    kept_probe: bool
    rows: list[dict]  # per candidate: val accuracy and its SE, the paired gain over the probe and its SE


def paired(correct: np.ndarray, probe: np.ndarray) -> tuple[float, float]:
    """The mean per-image gain over the probe, and its standard error (0 gain and 0 SE when they agree everywhere)."""
    d = correct.astype(np.float64) - probe.astype(np.float64)
    if len(d) < 2:
        return float(d.mean()) if len(d) else 0.0, math.inf
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def rank(c: dict) -> tuple[float, float]:
    """The sweep's rule: val accuracy, then the lower val loss."""
    return c["val_accuracy"], -c["val_loss"]


def clears(gain: float, se: float, margin: float) -> bool:
    return gain > 0 and gain >= margin * se


def wins(probe_correct, c: dict, *, margin: float) -> bool:
    """A candidate from a checkpoint written before per-image val results were kept cannot show a win: it never does."""
    if "val_correct" not in c:
        return False
    return clears(*paired(np.asarray(c["val_correct"]), np.asarray(probe_correct)), margin)


def key(probe_correct, c: dict, *, margin: float) -> tuple[bool, float, float]:
    """Orders candidates as `select` chooses among them: a winner over the probe first, then the best on val."""
    return (wins(probe_correct, c, margin=margin), *rank(c))


def select(probe_correct, candidates: list[dict], *, margin: float) -> Choice:
    """`candidates`: summaries with val_accuracy, val_loss and val_correct (0/1 per val image, the kept epoch's)."""
    probe = np.asarray(probe_correct)
    rows = []
    for c in candidates:
        if "val_correct" not in c:  # see `wins`
            rows.append({"val_accuracy": c["val_accuracy"], "val_se": math.nan, "gain": math.nan,
                         "gain_se": math.nan, "wins": False})
            continue
        correct = np.asarray(c["val_correct"])
        acc = float(correct.mean()) if len(correct) else 0.0
        gain, se = paired(correct, probe)
        rows.append({"val_accuracy": acc, "val_se": math.sqrt(acc * (1 - acc) / max(1, len(correct))),
                     "gain": gain, "gain_se": se, "wins": clears(gain, se, margin)})
    best = max(range(len(candidates)), key=lambda i: (rows[i]["wins"], *rank(candidates[i])))  # as `key` orders
    return Choice(index=best, kept_probe=not rows[best]["wins"], rows=rows)


def on_test(rows: list[dict], candidates: list[dict], probe_test) -> list[dict]:
    """`select`'s rows with each candidate's test accuracy and paired test gain over the probe: reported only."""
    probe = np.asarray(probe_test)
    out = []
    for r, c in zip(rows, candidates):
        correct = np.asarray(c.get("test_correct", []))
        if not len(correct) or len(correct) != len(probe):
            out.append(r)
            continue
        gain, se = paired(correct, probe)
        out.append({**r, "test_accuracy": float(correct.mean()), "test_gain": gain, "test_gain_se": se,
                    "probe_test_accuracy": float(probe.mean())})
    return out
