"""Real demo data from Debian's `dataset-fashion-mnist`, written as an imagefolder of PNGs.

    python -m ftl.datasets data/fashion-mnist --per-class 200
"""

from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

# Where Debian's package puts the IDX files; elsewhere (a machine without apt) point the variable at a copy.
FASHION_MNIST = Path(os.environ.get("FTL_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def read_idx(path: Path) -> np.ndarray:
    """IDX files: a big-endian header of dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(part: str) -> tuple[np.ndarray, np.ndarray]:
    """('train' | 't10k') → images (N, 28, 28) and labels (N,)."""
    if not FASHION_MNIST.exists():
        raise FileNotFoundError(f"{FASHION_MNIST} is missing: apt-get install dataset-fashion-mnist")
    return read_idx(FASHION_MNIST / f"{part}-images-idx3-ubyte.gz"), read_idx(FASHION_MNIST / f"{part}-labels-idx1-ubyte.gz")


def take(labels: np.ndarray, per_class: int, *, skip: int = 0) -> np.ndarray:
    """The first `per_class` indices of every class after skipping `skip` of each: balanced, deterministic."""
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[skip : skip + per_class] for c in range(len(CLASSES))]))


def write_imagefolder(root: str | os.PathLike, *, per_class: int, val_per_class: int | None = None,
                      test_per_class: int | None = None, fmt: str = "png", size: int | None = None) -> int:
    """train/val from Fashion-MNIST's training file, test from its test file; returns images written."""
    root = Path(root)
    train_x, train_y = load("train")
    test_x, test_y = load("t10k")
    val_n = per_class // 4 if val_per_class is None else val_per_class
    test_n = per_class // 4 if test_per_class is None else test_per_class
    plan = [("train", train_x, train_y, take(train_y, per_class)),
            ("val", train_x, train_y, take(train_y, val_n, skip=per_class)),
            ("test", test_x, test_y, take(test_y, test_n))]
    count = 0
    for split, xs, ys, idx in plan:
        for i in idx:
            folder = root / split / CLASSES[ys[i]]
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(xs[i], "L")
            if size:
                img = img.convert("RGB").resize((size, size * 3 // 4), Image.Resampling.BICUBIC)
            img.save(folder / f"{split}-{i:05d}.{fmt}", quality=90) if fmt == "jpg" else img.save(folder / f"{split}-{i:05d}.{fmt}")
            count += 1
    return count


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--per-class", type=int, default=200, help="training images per class")
    parser.add_argument("--format", default="png", choices=["png", "jpg"])
    parser.add_argument("--size", type=int, default=None, help="upscale to size x 3/4 size (for benchmarks)")
    args = parser.parse_args()
    n = write_imagefolder(args.root, per_class=args.per_class, fmt=args.format, size=args.size)
    print(f"wrote {n} images to {args.root}")
