"""Heads at scale: time and memory per Ray Train worker for AdamW (held, streamed) and L-BFGS.

    python benchmarks/heads_at_scale.py                        # 1M train rows × 1,280 dims × 1,000 classes
    python benchmarks/heads_at_scale.py --rows 200000          # what a 2-core, 24 GiB machine runs

Synthetic features: one Gaussian blob per class (means drawn once, unit noise), float32, classes
balanced; val and test have --rows/20 rows each. Every method goes through `ftl.train.fit.fit`, the
code `ftl train` runs: the memory plan first, then a TorchTrainer whose workers read the rows
through Ray Data. A method the plan refuses prints its error instead of numbers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import psutil

from ftl.config import TrainConfig
from ftl.errors import TrainError
from ftl.fitting import evaluate
from ftl.pipeline.runtime import ensure_ray
from ftl.train import fit, memory, worker

GIB = 1 << 30


def blobs(rows: int, *, dims: int, classes: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`rows` float32 features around per-class means, written in chunks (no float64 copy of the whole)."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(0).normal(0, spread, (classes, dims)).astype(np.float32)
    y = rng.permutation(np.arange(rows) % classes)
    x = np.empty((rows, dims), dtype=np.float32)
    for i in range(0, rows, 8192):
        x[i : i + 8192] = rng.standard_normal((min(8192, rows - i), dims), dtype=np.float32) + means[y[i : i + 8192]]
    return x, y.astype(np.int64)


def methods(args) -> list[tuple[str, TrainConfig, bool]]:
    """(name, train config, stream) for each method run."""
    common = {"epochs": args.epochs, "patience": args.epochs, "workers": args.workers, "batch_size": args.batch_size}
    return [
        ("AdamW, train held in memory", TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-4, **common), False),
        ("AdamW, streamed through Ray Data", TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-4, **common),
         True),
        ("L-BFGS, full batch", TrainConfig(optimizer="lbfgs", weight_decay=1e-4, **common), False),
    ]


def refusal(cfg: TrainConfig, stream: bool, args) -> str | None:
    """Why ftl would not run this method at this size (memory.decide, with the memory free now), or None."""
    try:
        must_stream, need, budget = memory.decide(cfg, rows=args.rows, val_rows=max(1, args.rows // 20), dim=args.dims,
                                                classes=args.classes)
    except TrainError as e:
        return f"refused before starting: {e}"
    if must_stream and not stream:
        return f"skipped: held whole it needs {memory.gib(need.held)} GiB a worker, over {memory.gib(budget)}"
    return None


def run(name: str, cfg: TrainConfig, stream: bool, x: dict, y: dict, *, classes: int, iters: int, tmp: str):
    """One method through ftl.train.fit.fit: its row of the table."""
    f = fit.fit(cfg, x, y, classes=classes, storage_path=tmp, run_name=name.split(",")[0], stream=stream,
                lbfgs_iters=iters)
    epoch = np.median([h["epoch_seconds"] for h in f.history])
    passes = np.median([h.get("passes", 1) for h in f.history])
    test = evaluate.metrics(evaluate.outcome(f.head, x["test"], y["test"]))
    return name, {"seconds": f.seconds, "epochs": len(f.history), "epoch_s": epoch, "pass_s": epoch / passes,
                  "test_acc": test["accuracy"], "rss": f.peak_rss / GIB, "private": f.peak_private / GIB,
                  "estimate": f.estimate / GIB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="train rows (val and test: rows/20 each)")
    p.add_argument("--dims", type=int, default=1280)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (train.workers)")
    p.add_argument("--epochs", type=int, default=1, help="AdamW passes; L-BFGS rounds of --lbfgs-iters iterations")
    p.add_argument("--lbfgs-iters", type=int, default=worker.LBFGS_ITERS, help="L-BFGS iterations per round")
    p.add_argument("--batch-size", type=int, default=1024, help="AdamW global batch")
    p.add_argument("--spread", type=float, default=0.12, help="std of the class means (noise std is 1)")
    p.add_argument("--only", default="", help="comma-separated method numbers to run, e.g. 1,3")
    args = p.parse_args()

    ensure_ray()
    with memory.Peak() as driver:
        rows = measure(args)
    print_table(rows, driver)


def measure(args) -> list[tuple[str, dict | str]]:
    """Make the features if any method will run, run those: a row per method."""
    started = time.perf_counter()
    chosen = {int(i) for i in args.only.split(",") if i} or None
    todo = [(name, cfg, stream, refusal(cfg, stream, args)) for i, (name, cfg, stream) in enumerate(methods(args), 1)
            if chosen is None or i in chosen]
    budget, source = memory.budget(args.workers)
    print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / GIB:.1f} GiB, load average "
          f"{os.getloadavg()[0]:.1f}; {args.workers} worker(s) may use {memory.gib(budget)} GiB each ({source})")
    if all(why for *_, why in todo):
        return [(name, why) for name, _, _, why in todo]
    extra = max(1, args.rows // 20)
    parts = {s: blobs(n, dims=args.dims, classes=args.classes, spread=args.spread, seed=i)
             for i, (s, n) in enumerate((("train", args.rows), ("val", extra), ("test", extra)))}
    x, y = {s: v[0] for s, v in parts.items()}, {s: v[1] for s, v in parts.items()}
    print(f"synthetic features: train {args.rows:,} × {args.dims:,} dims × {args.classes:,} classes "
          f"({x['train'].nbytes / GIB:.2f} GiB float32), val and test {extra:,} each, made in "
          f"{time.perf_counter() - started:.0f}s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftl-heads-") as tmp:
        for name, cfg, stream, why in todo:
            why = why or refusal(cfg, stream, args)  # again, now that this process holds the features
            rows.append((name, why) if why else run(name, cfg, stream, x, y, classes=args.classes,
                                                    iters=args.lbfgs_iters, tmp=tmp))
            print(f"  done: {name} ({time.perf_counter() - started:.0f}s so far)", flush=True)
    return rows


def print_table(rows: list[tuple[str, dict | str]], driver: memory.Peak) -> None:
    print(f"\n{'method':<34} {'total s':>8} {'epochs':>6} {'s/epoch':>8} {'s/pass':>7} {'test acc':>8} "
          f"{'worker peak: private':>20} {'RSS':>5} {'estimate':>8}  (GiB)")
    for name, r in rows:
        if isinstance(r, str):
            print(f"{name:<34} {r}")
            continue
        print(f"{name:<34} {r['seconds']:>8.1f} {r['epochs']:>6d} {r['epoch_s']:>8.1f} {r['pass_s']:>7.1f} "
              f"{r['test_acc']:>8.4f} {r['private']:>20.2f} {r['rss']:>5.2f} {r['estimate']:>8.2f}")
    print(f"driver peak: private {driver.private / GIB:.2f} GiB, RSS {driver.rss / GIB:.2f} GiB; "
          f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
