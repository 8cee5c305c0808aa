"""One head-fitting worker's work, wherever it runs (a Ray Train worker, or the one task of ftl.train.solo).

It reads its rows, fits the head for each weight decay (L-BFGS full-batch, or AdamW minibatches
with DDP across a worker group), and returns the kept head's history, metrics and state.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ftl.config import TrainConfig
from ftl.fitting import core, live
from ftl.fitting.workers import all_reduce
from ftl.model import heads
from ftl.train import memory, shards
from ftl.train.job import HeadJob

LBFGS_ITERS = 20  # L-BFGS iterations per reported "epoch"
# Converged once no gradient entry of the mean loss (plus its L2 term) exceeds this. scikit-learn's
# lbfgs default, 1e-4 on an objective scaled the same way, stopped the grid's fits short enough to
# change which weight decay won (benchmarks/train.py: C=0.1 against 0.01); at 1e-5 the path chooses
# and scores as fits run to 1e-9 do, in 2.9 s against 4.0 s.
LBFGS_TOLERANCE_GRAD = 1e-5


def train_worker(job: HeadJob, *, device: torch.device, rank: int, world: int, load) -> dict:
    """One worker's fit: read the rows (`load(split, rows)` → tensors), fit the head for each weight decay.

    Returns the kept head's history, metrics and state, and the sweep over weight decays.
    """
    cfg = job.train
    per_worker = max(1, cfg.batch_size // world)
    torch.manual_seed(cfg.seed)
    xv, yv = load("val", job.rows["val"])
    if job.stream:
        x = y = None
        rows = job.rows["train"] // world  # the equal split's size
    else:
        x, y = load("train", -(-job.rows["train"] // world))
        # Equal steps on every worker, or DDP would wait forever on the one with fewer.
        rows = int(all_reduce(torch.tensor(len(y), device=device), "min").item())
        x, y = x[:rows], y[:rows]
    weight = torch.as_tensor(job.class_weights, device=device) if job.class_weights else None
    grid = cfg.weight_decay if isinstance(cfg.weight_decay, list) else [cfg.weight_decay]
    results = []
    # A linear head under L-BFGS is a convex problem: its optimum does not depend on where it starts. So
    # the grid is fitted as a regularisation path, as scikit-learn's LogisticRegressionCV and glmnet do:
    # from the strongest weight decay down, each fit starting from the one before, already near its own
    # optimum (benchmarks/train.py's seven: 8.3 s cold, 2.9 s as a path, the same choice and test
    # accuracy). Any other head starts every fit from the same initialisation, so that the grid's
    # points compare fairly.
    path = cfg.optimizer == "lbfgs" and not job.head["hidden"] and job.lbfgs_path
    order = sorted(grid, reverse=True) if path else grid
    start = job.initial
    for i, wd in enumerate(order):
        # Rank 0 speaks for all: every worker takes the same early-stopping decision on the same val.
        on_epoch = live.reporter(job.progress if rank == 0 else None, epochs=cfg.epochs, fit=i + 1,
                                 fits=len(grid), what="weight decay", note=f"weight decay {wd:g}")
        torch.manual_seed(cfg.seed)
        head = heads.build(job.head, start).to(device)
        if cfg.optimizer == "lbfgs":
            history, best_state = fit_lbfgs(cfg, head, x, y, xv, yv, weight=weight, wd=wd, iters=job.lbfgs_iters,
                                            world=world, on_epoch=on_epoch, tolerance=job.lbfgs_tolerance)
        else:
            g = torch.Generator().manual_seed(cfg.seed + rank)
            batches = (shards.streamed(device, batch_size=per_worker, seed=cfg.seed + rank) if job.stream
                       else shards.in_memory(x, y, batch_size=per_worker, generator=g))
            history, best_state = fit_adamw(cfg, head, batches, xv, yv, rows=rows, weight=weight, wd=wd,
                                            world=world, on_epoch=on_epoch)
        best = min(history, key=lambda h: h["val_loss"])
        results.append({"weight_decay": wd, "history": history, "best": best, "state": best_state})
        start = best_state if path else job.initial
    results.sort(key=lambda r: grid.index(r["weight_decay"]))  # the sweep in the workflow's order
    # The sweep keeps the best val accuracy; early stopping within a fit follows val loss.
    chosen = max(results, key=lambda r: (r["best"]["val_accuracy"], -r["best"]["val_loss"]))
    return {
        "history": chosen["history"], "best": {**chosen["best"], "weight_decay": chosen["weight_decay"]},
        "sweep": [{"weight_decay": r["weight_decay"], **r["best"], "epochs_run": len(r["history"]),
                   "passes_run": sum(h.get("passes", 0) for h in r["history"])} for r in results],
        "device": str(device),
        "state": chosen["state"],
    }


def fit_adamw(cfg: TrainConfig, head: heads.Head, batches, xv, yv, *, rows: int, weight, wd: float, world: int = 1,
              on_epoch=None):
    """Minibatch AdamW over `batches(epoch)`, cosine schedule, early stopping on val loss; DDP across workers."""
    if world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(head)
    else:
        model = head
    opt = torch.optim.AdamW(core.param_groups(head, lr=cfg.lr, weight_decay=wd))
    sched = core.cosine(opt, epochs=cfg.epochs, rows=rows, batch_size=max(1, cfg.batch_size // world))
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    stop = core.EarlyStopping(cfg.patience)
    for epoch in range(cfg.epochs):
        model.train()
        started, total, seen = time.perf_counter(), torch.zeros(2, dtype=torch.float64, device=xv.device), 0
        for xb, yb in batches(epoch):
            loss = loss_fn(model(xb), yb)
            core.step(loss, opt=opt, sched=sched)
            total[0] += loss.item() * len(yb)
            seen += len(yb)
        total[1] = seen
        total = all_reduce(total)
        stopped = stop.observe(head, xv, yv, epoch=epoch, train_loss=(total[0] / total[1]).item(),
                               lr=sched.get_last_lr()[0])
        stop.history[-1]["epoch_seconds"] = time.perf_counter() - started
        if on_epoch:
            on_epoch(stop.history[-1])
        if stopped:
            break
    return stop.history, stop.best(head)


def fit_lbfgs(cfg: TrainConfig, head: heads.Head, x, y, xv, yv, *, weight, wd: float, iters: int = LBFGS_ITERS,
              world: int = 1, on_epoch=None, tolerance: float | None = None):
    """Full-batch L-BFGS on the L2-regularised cross-entropy (the linear-probe protocol)."""
    # Loss and gradients are summed over all workers by hand (not DDP), so every worker
    # takes the same line-search steps and the parameters stay identical.
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=iters, history_size=memory.LBFGS_HISTORY,
                            line_search_fn="strong_wolfe", tolerance_grad=tolerance or LBFGS_TOLERANCE_GRAD,
                            tolerance_change=1e-12)
    denom = float(weight[y].sum().item()) if weight is not None else float(len(y))
    denom = all_reduce(torch.tensor(denom, dtype=torch.float64, device=x.device)).item()

    passes = [0]

    def closure():
        passes[0] += 1
        opt.zero_grad(set_to_none=True)
        # The full batch in chunks, gradients summed: working memory is one chunk's logits, not the split's.
        data = torch.zeros((), dtype=torch.float64, device=x.device)
        for i in range(0, len(y), memory.CHUNK_ROWS):
            part = nn.functional.cross_entropy(head(x[i : i + memory.CHUNK_ROWS]), y[i : i + memory.CHUNK_ROWS],
                                               weight=weight, label_smoothing=cfg.label_smoothing,
                                               reduction="sum") / denom
            part.backward()
            data += part.detach()
        if world > 1:
            for p in head.parameters():
                all_reduce(p.grad)
            data = all_reduce(data)
        reg = 0.5 * wd * sum((w * w).sum() for w in core.decayed(head))
        if wd:
            reg.backward()
        return data.float() + reg.detach()

    stop = core.EarlyStopping(cfg.patience)
    head.train()
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        train_loss = float(opt.step(closure))
        stopped = stop.observe(head, xv, yv, epoch=epoch, train_loss=train_loss, lr=1.0)
        stop.history[-1].update(epoch_seconds=time.perf_counter() - started, passes=passes[0])
        passes[0] = 0
        if on_epoch:
            on_epoch(stop.history[-1])
        head.train()
        if stopped:
            break
        if opt.state[next(head.parameters())].get("n_iter", 0) < (epoch + 1) * iters:
            break  # converged: L-BFGS stopped before its iteration budget
    return stop.history, stop.best(head)
