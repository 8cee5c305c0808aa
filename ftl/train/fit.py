"""Fitting a head with Ray Train: TorchTrainer workers read their shard through Ray Data.

Each worker holds its shard in memory (features are small next to images), so an epoch
costs a pass over a tensor, not a pass through the Ray Data pipeline. Val is given whole
to every worker, so all of them take the same early-stopping decision.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ftl.config import TrainConfig
from ftl.io import storage
from ftl.model import heads
from ftl.train import core

LBFGS_ITERS = 20  # L-BFGS iterations per reported "epoch"


@dataclass
class Fit:
    head: heads.Head
    history: list[dict]
    best: dict  # metrics of the kept epoch, with its weight decay
    sweep: list[dict]
    checkpoint: str
    workers: int
    device: str
    seconds: float


def to_dataset(x: np.ndarray, y: np.ndarray, *, blocks: int):
    """Arrays → a Ray Dataset of tensor rows, in a few blocks so shards can stream."""
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    step = max(1, math.ceil(len(y) / blocks))
    return ray.data.from_arrow([
        pa.table({"x": ArrowTensorArray.from_numpy(x[i : i + step]), "y": pa.array(y[i : i + step])})
        for i in range(0, len(y), step)
    ])


def shard_tensors(name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import ray.train

    xs, ys = [], []
    for batch in ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=8192, dtypes=None):
        xs.append(batch["x"].float())
        ys.append(batch["y"].long())
    return torch.cat(xs).to(device), torch.cat(ys).to(device)


def all_reduce(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return value


def train_loop(config: dict) -> dict:
    """Runs on every Ray Train worker; rank 0 returns the history."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["train"])
    device = ray.train.torch.get_device()
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.seed)
    x, y = shard_tensors("train", device)
    xv, yv = shard_tensors("val", device)
    # Equal steps on every worker, or DDP would wait forever on the one with fewer.
    n = int(all_reduce(torch.tensor(len(y), device=device), "min").item())
    weight = torch.as_tensor(config["class_weights"], device=device) if config["class_weights"] else None
    grid = cfg.weight_decay if isinstance(cfg.weight_decay, list) else [cfg.weight_decay]
    results = []
    for wd in grid:
        torch.manual_seed(cfg.seed)
        head = heads.build(config["head"], config["initial"]).to(device)
        fitter = fit_lbfgs if cfg.optimizer == "lbfgs" else fit_adamw
        history, best_state = fitter(cfg, head, x[:n], y[:n], xv, yv, weight=weight, wd=wd)
        best = min(history, key=lambda h: h["val_loss"])
        results.append({"weight_decay": wd, "history": history, "best": best, "state": best_state})
    # The sweep keeps the best val accuracy; early stopping within a fit follows val loss.
    chosen = max(results, key=lambda r: (r["best"]["val_accuracy"], -r["best"]["val_loss"]))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save(chosen["state"], os.path.join(tmp, "head.pt"))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**chosen["best"], "weight_decay": chosen["weight_decay"]}, checkpoint=checkpoint)
    return {
        "history": chosen["history"], "best": {**chosen["best"], "weight_decay": chosen["weight_decay"]},
        "sweep": [{"weight_decay": r["weight_decay"], **r["best"]} for r in results], "device": str(device),
    }


def fit_adamw(cfg: TrainConfig, head: heads.Head, x, y, xv, yv, *, weight, wd: float):
    """Minibatch AdamW, cosine schedule, early stopping on val loss; DDP across workers."""
    import ray.train.torch

    world = ray_world()
    model = ray.train.torch.prepare_model(head) if world > 1 else head
    opt = torch.optim.AdamW(core.param_groups(head, lr=cfg.lr, weight_decay=wd))
    per_worker = max(1, cfg.batch_size // world)
    sched = core.cosine(opt, epochs=cfg.epochs, rows=len(y), batch_size=per_worker)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    g = torch.Generator().manual_seed(cfg.seed + ray.train.get_context().get_world_rank())
    stop = core.EarlyStopping(cfg.patience)
    for epoch in range(cfg.epochs):
        model.train()
        total = 0.0
        for idx in core.minibatches(len(y), batch_size=per_worker, generator=g, device=x.device):
            loss = loss_fn(model(x[idx]), y[idx])
            core.step(loss, opt=opt, sched=sched)
            total += loss.item() * len(idx)
        train_loss = all_reduce(torch.tensor(total, device=x.device)).item() / (len(y) * world)
        if stop.observe(head, xv, yv, epoch=epoch, train_loss=train_loss, lr=sched.get_last_lr()[0]):
            break
    return stop.history, stop.best(head)


def fit_lbfgs(cfg: TrainConfig, head: heads.Head, x, y, xv, yv, *, weight, wd: float):
    """Full-batch L-BFGS on the L2-regularised cross-entropy (the linear-probe protocol)."""
    # Loss and gradients are summed over all workers by hand (not DDP), so every worker
    # takes the same line-search steps and the parameters stay identical.
    world = ray_world()
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=LBFGS_ITERS, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
    denom = float(weight[y].sum().item()) if weight is not None else float(len(y))
    denom = all_reduce(torch.tensor(denom, dtype=torch.float64, device=x.device)).item()

    def closure():
        opt.zero_grad(set_to_none=True)
        data = nn.functional.cross_entropy(head(x), y, weight=weight, label_smoothing=cfg.label_smoothing,
                                           reduction="sum") / denom
        data.backward()
        if world > 1:
            for p in head.parameters():
                all_reduce(p.grad)
            data = all_reduce(data.detach().clone())
        reg = 0.5 * wd * sum((w * w).sum() for w in core.decayed(head))
        if wd:
            reg.backward()
        return data.detach() + reg.detach()

    stop = core.EarlyStopping(cfg.patience)
    head.train()
    for epoch in range(cfg.epochs):
        train_loss = float(opt.step(closure))
        stopped = stop.observe(head, xv, yv, epoch=epoch, train_loss=train_loss, lr=1.0)
        head.train()
        if stopped:
            break
        if opt.state[next(head.parameters())].get("n_iter", 0) < (epoch + 1) * LBFGS_ITERS:
            break  # converged: L-BFGS stopped before its iteration budget
    return stop.history, stop.best(head)


def ray_world() -> int:
    import ray.train

    return ray.train.get_context().get_world_size()


def fit(cfg: TrainConfig, x: dict, y: dict, *, classes: int, storage_path: str, run_name: str,
        storage_options: dict | None = None) -> Fit:
    """Fit one head (or a weight-decay sweep) with TorchTrainer; the kept head comes from its checkpoint."""
    import ray.train
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.perf_counter()
    torch.manual_seed(cfg.seed)  # the initial head, shared by every worker and sweep value
    mean, std = heads.standardisation(x["train"])
    dim = x["train"].shape[1]
    head_config = {"dim": dim, "classes": classes, "hidden": cfg.hidden if cfg.head == "mlp" else [],
                   "dropout": cfg.dropout if cfg.head == "mlp" else 0.0}
    initial = heads.Head(dim, classes, hidden=head_config["hidden"], mean=mean, std=std).state_dict()
    weights = heads.class_weights(y["train"], classes, cfg.class_weights)
    use_gpu = cfg.use_gpu if isinstance(cfg.use_gpu, bool) else ray_has_gpu()
    # Ray Train wants a pyarrow filesystem and, for S3, the bucket/key form of the path.
    loc = storage.locate(storage_path, storage_options)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": cfg.model_dump(mode="json"), "head": head_config, "initial": initial,
                           "class_weights": None if weights is None else weights.tolist()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=loc.path, storage_filesystem=PyFileSystem(FSSpecHandler(loc.fs)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
        datasets={"train": to_dataset(x["train"], y["train"], blocks=max(2, cfg.workers * 2)),
                  "val": to_dataset(x["val"], y["val"], blocks=1)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    out = result.return_value
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "head.pt"), map_location="cpu", weights_only=True)
    head = heads.build(head_config, state).eval()
    return Fit(head=head, history=out["history"], best=out["best"], sweep=out["sweep"],
               checkpoint=loc.to_uri(result.checkpoint.path), workers=cfg.workers, device=out["device"],
               seconds=time.perf_counter() - started)


def ray_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
