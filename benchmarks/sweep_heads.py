"""The sweep's head training alone: every layer × lr × weight decay head of `ftl sweep`, fitted at once.

    python benchmarks/sweep_heads.py                 # 5 layers × 6 grid points, 3,000 train rows

The features are synthetic (class centres plus noise, at MobileNetV2's pooled widths of the five
layers a sweep taps by default), so the time is the training's alone: no extraction, no MLflow.
It prints the wall time, and the same fit at 10× the rows for the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ftl.config.training import SweepConfig
from ftl.train import probe

DIMS = {"features.4": 32, "features.7": 64, "features.11": 96, "features.14": 160, "features.18": 1280}


def fit(rows: int, val_rows: int, classes: int, seed: int = 0) -> tuple[float, list]:
    rng = np.random.default_rng(seed)
    y, yv = rng.integers(0, classes, rows), rng.integers(0, classes, val_rows)
    centres = {k: rng.normal(size=(classes, d)).astype(np.float32) for k, d in DIMS.items()}
    x = {k: (centres[k][y] + 3 * rng.normal(size=(rows, d))).astype(np.float32) for k, d in DIMS.items()}
    xv = {k: (centres[k][yv] + 3 * rng.normal(size=(val_rows, d))).astype(np.float32) for k, d in DIMS.items()}
    s = SweepConfig()  # the defaults a user gets
    started = time.perf_counter()
    trials = probe.fit_heads(x, y, xv, yv, classes=classes, lrs=s.lr, weight_decays=s.weight_decay, epochs=s.epochs,
                             batch_size=s.batch_size, patience=s.patience)
    return time.perf_counter() - started, trials


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=3000, help="train rows (val: a third)")
    p.add_argument("--classes", type=int, default=10)
    args = p.parse_args()
    for rows in (args.rows, 10 * args.rows):
        seconds, trials = fit(rows, rows // 3, args.classes)
        epochs = sum(len(t.history) for t in trials)
        print(f"{len(trials)} heads ({len(DIMS)} layers × {len(trials) // len(DIMS)} grid points) on {rows:,} rows: "
              f"{seconds:.1f}s, {epochs} head-epochs, {torch.get_num_threads()} torch threads")


if __name__ == "__main__":
    main()
