"""Planning a rerun at scale: driver memory and time of the distributed listing and diff, and S3 listing speed.

    python benchmarks/scale.py --sizes 1000000 10000000 --s3-objects 200000

Part 1, per size N: a synthetic source of N images as sharded Parquet manifests (uri, label, split,
ETag: the version, no request per object) and an output whose features table holds all but 1% of
them (ids and URIs; no model runs). Each plan runs in its own process, as `ftl extract` would
plan it: the listing read by Ray tasks, duplicates dropped, the joins against the committed ids.
It reports that driver's peak RSS, the whole process tree's peak PSS (Ray's workers and object
store included) and the wall time of a no-op rerun (every image committed) and a 1%-new rerun.
The driver-side path (one manifest file, the diff on the driver) runs at the smallest size for
reference.

Part 2: listing an imagefolder of `--s3-objects` objects in `--s3-folders` folders on an S3
endpoint (benchmarks/_s3_listing_server.py: ListObjectsV2 from a sorted list, so the server's own
cost stays small, as S3's does) through a loopback proxy that adds `--latency` seconds to every
request: s3fs's sequential `find` against ftl's parallel listing (ftl.sources.fanout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as c  # noqa: E402

ROWS_PER_FILE = 500_000
CLASSES = [f"class{i:03d}" for i in range(100)]


def synthesize(folder: Path, n: int) -> None:
    """`folder/manifest/part-*.parquet` (n rows) and `folder/out/features` holding all but 1% of them."""
    from deltalake import write_deltalake

    from ftl.sources import listing

    (folder / "manifest").mkdir(parents=True)
    features = folder / "out" / "features"
    for start in range(0, n, ROWS_PER_FILE):
        idx = np.arange(start, min(n, start + ROWS_PER_FILE))
        split = np.where(idx % 10 < 8, "train", np.where(idx % 10 < 9, "val", "test"))
        label = np.array(CLASSES)[idx % len(CLASSES)]
        uris = [f"s3://images/catalog/{s}/{lab}/{i:010d}.jpg" for s, lab, i in zip(split, label, idx)]
        etags = [hashlib.md5(str(i).encode()).hexdigest() for i in idx]
        pq.write_table(pa.table({"uri": uris, "label": label, "split": split, "etag": etags}),
                       folder / "manifest" / f"part-{start // ROWS_PER_FILE:05d}.parquet")
        done = idx % 100 != 0  # 1% new since the last run
        ids = [listing.image_id(u, f"etag:{e}") for u, e, d in zip(uris, etags, done) if d]
        rows = pa.table({"image_id": ids, "uri": [u for u, d in zip(uris, done) if d],
                         "label": label[done], "split": split[done]})
        write_deltalake(str(features), rows, mode="append")


def mark_all_done(folder: Path) -> None:
    """The output after the 1%-new rerun committed the rest: every listed image is done."""
    from deltalake import write_deltalake

    from ftl.sources import listing

    for f in sorted((folder / "manifest").glob("*.parquet")):
        t = pq.read_table(f)
        keep = np.arange(t.num_rows) % 100 == 0
        t = t.filter(pa.array(keep))
        ids = [listing.image_id(u, f"etag:{e}") for u, e in zip(t["uri"].to_pylist(), t["etag"].to_pylist())]
        write_deltalake(str(folder / "out" / "features"), pa.table(
            {"image_id": ids, "uri": t["uri"], "label": t["label"], "split": t["split"]}), mode="append")


PLAN = """
import json, resource, sys, time
started = time.perf_counter()
import ray
from ftl.config import SourceConfig
from ftl.io import distributed_diff, incremental, storage
from ftl.sources import distributed, listing
how, manifest, out = sys.argv[1:4]
ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
ready = time.perf_counter()
if how == "distributed":
    listed = distributed.list_source(SourceConfig(uri=manifest, format="manifest"), None)
    work = distributed_diff.diff(listed.rows, listed.listed, storage.locate(out), ("features", "quarantine"))
    todo, n = work.todo_rows, listed.listed
else:
    images, _ = listing.list_unique(SourceConfig(uri=manifest, format="manifest"))
    work = incremental.diff(images, storage.locate(out), ("features", "quarantine"))
    todo, n = work.todo.num_rows, images.num_rows
print(json.dumps({"listed": n, "todo": todo, "seconds": time.perf_counter() - started,
                  "ray_start": ready - started,
                  "driver_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def plan(how: str, manifest: str, out: str) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", PLAN, how, manifest, out], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    with c.MemorySampler(root=proc.pid, interval=0.5) as mem:
        stdout, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"plan ({how}) failed with exit code {proc.returncode}")
    return json.loads(stdout.strip().splitlines()[-1]) | {"tree_peak_pss": mem.peak_pss}


def part1(sizes: list[int], work: Path) -> list[dict]:
    results = []
    for n in sizes:
        folder = work / f"n{n}"
        t0 = time.perf_counter()
        synthesize(folder, n)
        print(f"[{n:,}] synthesized in {time.perf_counter() - t0:.0f}s", flush=True)
        manifest, out = str(folder / "manifest"), str(folder / "out")
        if n == min(sizes):
            one = folder / "one.parquet"
            pq.write_table(pa.concat_tables([pq.read_table(f) for f in sorted((folder / "manifest").glob("*"))]), one)
            results.append({"n": n, "how": "driver", "case": "1% new"} | plan("driver", str(one), out))
            print(results[-1], flush=True)
        results.append({"n": n, "how": "distributed", "case": "1% new"} | plan("distributed", manifest, out))
        print(results[-1], flush=True)
        mark_all_done(folder)
        results.append({"n": n, "how": "distributed", "case": "no-op"} | plan("distributed", manifest, out))
        print(results[-1], flush=True)
    return results


def part2(objects: int, latency: float, folders: int) -> dict:
    """Sequential `find` vs ftl's parallel listing of an imagefolder on an S3 endpoint behind a slow proxy."""
    import _s3_listing_server
    import ray
    import s3fs
    from tests.proxy import Proxy

    keys = [f"images/train/c{i % folders:04d}/{i:09d}.jpg" for i in range(objects)]
    server = _s3_listing_server.serve("bench", keys)
    proxy = Proxy(server.server_address[1], request_delay=latency)
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": proxy.url})
    from ftl.io import storage
    from ftl.sources import fanout

    t0 = time.perf_counter()
    found = s3fs.S3FileSystem(client_kwargs={"endpoint_url": proxy.url}).find("bench/images")
    sequential = time.perf_counter() - t0
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    t0 = time.perf_counter()  # from a running cluster: its start is the same for both ways
    refs, pieces = fanout.listing_refs(storage.locate("s3://bench/images"), [".jpg"], None)
    listed = ray.data.from_arrow_refs(refs).count()
    parallel = time.perf_counter() - t0
    ray.shutdown()
    server.shutdown()
    assert len(found) == listed == objects, (len(found), listed, objects)
    return {"objects": objects, "folders": folders, "latency": latency, "sequential_s": sequential,
            "parallel_s": parallel, "speedup": sequential / parallel, "folders_listed": pieces}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--s3-objects", type=int, default=200_000)
    ap.add_argument("--s3-folders", type=int, default=1_000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--skip-plan", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftl-scale-") as tmp:
        plans = [] if args.skip_plan else part1(sorted(args.sizes), Path(tmp))
    s3 = part2(args.s3_objects, args.latency, args.s3_folders) if args.s3_objects else None
    mib = 2**20
    print("\n| images | plan | case | todo | driver peak RSS | tree peak PSS | time (Ray start) |")
    print("|---|---|---|---|---|---|---|")
    for r in plans:
        print(f"| {r['n']:,} | {r['how']} | {r['case']} | {r['todo']:,} | {r['driver_peak_rss'] / mib:,.0f} MiB | "
              f"{r['tree_peak_pss'] / mib:,.0f} MiB | {r['seconds']:.0f} s ({r['ray_start']:.0f} s) |")
    dist = {r["n"]: r for r in plans if r["how"] == "distributed" and r["case"] == "no-op"}
    if len(dist) > 1:
        lo, hi = min(dist), max(dist)
        print(f"\ndriver peak RSS at {hi:,} / at {lo:,}: {dist[hi]['driver_peak_rss'] / dist[lo]['driver_peak_rss']:.2f}")
    if s3:
        print(f"\nS3 listing of {s3['objects']:,} objects in {s3['folders']} folders, +{s3['latency'] * 1000:.0f} ms "
              f"per request: sequential find {s3['sequential_s']:.1f} s, ftl's parallel listing "
              f"{s3['parallel_s']:.1f} s ({s3['folders_listed']} folders): {s3['speedup']:.1f}x")


if __name__ == "__main__":
    main()
