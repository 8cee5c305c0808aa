"""Photo-like JPEGs generated on the machine, as an imagefolder of exactly N images, cached for reruns.

No dataset is needed (a GPU machine may have none): each image is a smooth colour field, a
mid-frequency texture and sensor-like grain, which gives JPEGs of the size and decode cost of
photos (about 57 KB for 500x375 at quality 90), unlike flat synthetic pictures that compress
to a few KB and decode several times faster.

    python benchmarks/images.py 20000 [cache folder]    # prints the imagefolder's path; or folder(n, width)
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

CACHE = Path(__file__).resolve().parent / ".cache"
CLASSES = 10
SPLITS = ("train",) * 8 + ("val", "test")  # image i goes to SPLITS[i % 10]


def photo(seed: int, width: int) -> bytes:
    """One JPEG of `width` x 3/4 `width`; the same seed gives the same bytes."""
    height = width * 3 // 4
    rng = np.random.default_rng(seed)
    colours = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    base = np.asarray(colours.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    texture = (rng.normal(0, 1, (max(1, height // 12), max(1, width // 12), 3)) * 40 + 128).clip(0, 255)
    texture = Image.fromarray(texture.astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR)
    grain = rng.normal(0, 5, (height, width, 1)).astype(np.float32)
    pixels = (base + 0.6 * (np.asarray(texture, np.float32) - 128) + grain).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def relative(i: int) -> str:
    """Where image `i` lives in the imagefolder: split/class/name."""
    return f"{SPLITS[i % len(SPLITS)]}/class{i % CLASSES}/img-{i:06d}.jpg"


def write_range(root: str, start: int, stop: int, width: int) -> None:
    for i in range(start, stop):
        path = Path(root) / relative(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photo(i, width))


def generate(root: Path, n: int, width: int, *, workers: int | None = None) -> None:
    """Write images 0..n-1 under `root` on every core."""
    workers = workers or len(os.sched_getaffinity(0))
    step = -(-n // (workers * 4))
    with ProcessPoolExecutor(workers) as pool:
        for f in [pool.submit(write_range, str(root), s, min(n, s + step), width) for s in range(0, n, step)]:
            f.result()


def folder(n: int, width: int = 500, *, cache: Path = CACHE) -> Path:
    """An imagefolder of exactly `n` photo-like JPEGs, written once and reused."""
    root = cache / f"photos-w{width}-n{n}"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    generate(root, n, width)
    (root / ".complete").write_text(str(n))
    print(f"wrote {n} JPEGs ({width}x{width * 3 // 4}) to {root} in {time.perf_counter() - t:.0f}s (cached for "
          f"reruns)", file=sys.stderr)
    return root


def paths(root: Path) -> list[str]:
    """The image files of a folder from `folder`, in a fixed order."""
    return sorted(str(p) for p in root.glob("*/*/*.jpg"))


if __name__ == "__main__":
    count = int(sys.argv[1])
    print(folder(count, cache=Path(sys.argv[2]) if len(sys.argv) > 2 else CACHE))
