"""Fitting a head: in one Ray task when one worker holds it (ftl.train.solo), else TorchTrainer workers
reading their shards through Ray Data.

Each worker holds its shard in memory when it fits (features are small next to images), so
an epoch costs a pass over a tensor, not a pass through the Ray Data pipeline. When it does
not fit (`memory.decide`), AdamW streams the shard through Ray Data in batches every epoch, and
L-BFGS, which is full-batch, stops before starting and says so. Val is given whole to every
worker, so all of them take the same early-stopping decision.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import nn

from ftl import logs
from ftl.config import TrainConfig
from ftl.errors import TrainError
from ftl.fitting import core, live
from ftl.fitting.workers import all_reduce, run_config, torch_config, use_gpu
from ftl.model import heads
from ftl.train import memory, shards, solo
from ftl.train.job import HeadJob

LBFGS_ITERS = 20  # L-BFGS iterations per reported "epoch"
MAX_FAILURES = 2  # worker-group restarts before a fit fails (see the FailureConfig below)


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
    streamed: bool = False  # train read through Ray Data every epoch instead of held
    peak_rss: int = 0  # bytes: the largest peak resident memory of any worker, mapped object store pages included
    peak_private: int = 0  # bytes: the largest peak of any worker's private memory (what `estimate` predicts)
    estimate: int = 0  # bytes per worker that memory.need predicted


def train_loop(config: dict) -> dict:
    """Runs on every Ray Train worker; rank 0 returns the history and every worker's peak memory."""
    import ray.train
    import ray.train.torch

    logs.own_progress()
    device = ray.train.torch.get_device()
    rank, world = ray.train.get_context().get_world_rank(), ray_world()
    with memory.Peak() as peak:
        out = train_worker(config["job"], device=device, rank=rank, world=world,
                           load=lambda split, rows: shards.shard_tensors(split, device, rows=rows))
    # Ray Train keeps the head as the run's checkpoint: rank 0 writes it, every worker reports.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save(out.pop("state"), os.path.join(tmp, "head.pt"))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(out["best"], checkpoint=checkpoint)
    out.pop("state", None)
    # The largest peak of any worker; the private one is what memory.need estimates.
    peaks = all_reduce(torch.tensor([peak.rss, peak.private], device=device), "max").tolist()
    return {**out, "peak_rss": peaks[0], "peak_private": peaks[1]}


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
    for i, wd in enumerate(grid):
        # Rank 0 speaks for all: every worker takes the same early-stopping decision on the same val.
        on_epoch = live.reporter(job.progress if rank == 0 else None, epochs=cfg.epochs, fit=i + 1,
                                 fits=len(grid), what="weight decay", note=f"weight decay {wd:g}")
        torch.manual_seed(cfg.seed)
        head = heads.build(job.head, job.initial).to(device)
        if cfg.optimizer == "lbfgs":
            history, best_state = fit_lbfgs(cfg, head, x, y, xv, yv, weight=weight, wd=wd, iters=job.lbfgs_iters,
                                            world=world, on_epoch=on_epoch)
        else:
            g = torch.Generator().manual_seed(cfg.seed + rank)
            batches = (shards.streamed(device, batch_size=per_worker, seed=cfg.seed + rank) if job.stream
                       else shards.in_memory(x, y, batch_size=per_worker, generator=g))
            history, best_state = fit_adamw(cfg, head, batches, xv, yv, rows=rows, weight=weight, wd=wd,
                                            world=world, on_epoch=on_epoch)
        best = min(history, key=lambda h: h["val_loss"])
        results.append({"weight_decay": wd, "history": history, "best": best, "state": best_state})
    # The sweep keeps the best val accuracy; early stopping within a fit follows val loss.
    chosen = max(results, key=lambda r: (r["best"]["val_accuracy"], -r["best"]["val_loss"]))
    return {
        "history": chosen["history"], "best": {**chosen["best"], "weight_decay": chosen["weight_decay"]},
        "sweep": [{"weight_decay": r["weight_decay"], **r["best"]} for r in results], "device": str(device),
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
              world: int = 1, on_epoch=None):
    """Full-batch L-BFGS on the L2-regularised cross-entropy (the linear-probe protocol)."""
    # Loss and gradients are summed over all workers by hand (not DDP), so every worker
    # takes the same line-search steps and the parameters stay identical.
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=iters, history_size=memory.LBFGS_HISTORY,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
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


def ray_world() -> int:
    import ray.train

    return ray.train.get_context().get_world_size()


def fit(cfg: TrainConfig, x: dict, y: dict, *, classes: int, storage_path: str, run_name: str,
        storage_options: dict | None = None, stream: bool | None = None, lbfgs_iters: int = LBFGS_ITERS,
        worker_group: bool = False) -> Fit:
    """Fit one head (or a weight-decay sweep): in one Ray task when one worker holds it, else with TorchTrainer.

    For benchmarks: `stream=True` streams train even when it would fit held (else the memory a
    worker may use decides); `lbfgs_iters` sets L-BFGS iterations per epoch; `worker_group=True` fits on a
    worker group even when one task would do.
    """
    started = time.perf_counter()
    hidden = cfg.hidden if cfg.head == "mlp" else []
    rows = {s: len(y[s]) for s in ("train", "val")}
    dim = x["train"].shape[1]
    # Before anything is copied: an L-BFGS split that cannot fit stops here, with the numbers.
    auto, need, _ = memory.decide(cfg, rows=rows["train"], val_rows=rows["val"], dim=dim, classes=classes)
    stream = auto or bool(stream) and cfg.optimizer == "adamw"  # forcing can only add streaming, never overfill
    torch.manual_seed(cfg.seed)  # the initial head, shared by every worker and sweep value
    mean, std = core.standardisation(x["train"])
    head_config = {"dim": dim, "classes": classes, "hidden": hidden, "dropout": cfg.dropout if hidden else 0.0}
    initial = heads.Head(dim, classes, hidden=hidden, mean=mean, std=std).state_dict()
    weights = heads.class_weights(y["train"], classes, cfg.class_weights)
    gpu = use_gpu(cfg.use_gpu)
    shown = live.training("train")  # epochs as they end, from rank 0 (ftl.fitting.live)
    job = HeadJob(train=cfg, head=head_config, initial=initial,
                  class_weights=None if weights is None else weights.tolist(), stream=stream, rows=rows,
                  lbfgs_iters=lbfgs_iters, progress=shown.handle)
    try:
        with shown:
            if not (stream or worker_group) and cfg.workers == 1:  # one worker holds it: no group (train.solo)
                out = solo.run(job, x, y, gpu=gpu, retries=MAX_FAILURES)
                blob = out.pop("state")
                checkpoint = solo.save(blob, storage_path=storage_path, run_name=run_name,
                                       storage_options=storage_options)
                state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            else:
                out, checkpoint, state = group(job, x, y, gpu=gpu, storage_path=storage_path, run_name=run_name,
                                               storage_options=storage_options)
    except Exception as e:  # Ray's error wraps the worker's traceback, which it has already logged
        raise TrainError(f"fitting the head failed after {MAX_FAILURES} restarts of its workers: "
                         f"{str(e).splitlines()[0][:300]}\nThe features are unchanged: rerun the same command "
                         f"to fit again.") from e
    head = heads.build(head_config, state).eval()
    return Fit(head=head, history=out["history"], best=out["best"], sweep=out["sweep"], checkpoint=checkpoint,
               workers=cfg.workers, device=out["device"], seconds=time.perf_counter() - started, streamed=stream,
               peak_rss=out["peak_rss"], peak_private=out["peak_private"],
               estimate=need.streamed if stream else need.held)


def group(job: HeadJob, x: dict, y: dict, *, gpu: bool, storage_path: str, run_name: str,
          storage_options: dict | None) -> tuple[dict, str, dict]:
    """The fit on a TorchTrainer worker group reading its shards through Ray Data; the head from its checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = job.train
    # A head fits in seconds and, seeded, comes out the same: a restarted worker group fits it
    # again from the start. Only the kept head is checkpointed, at the end.
    loc, run = run_config(name=run_name, storage_path=storage_path, storage_options=storage_options,
                          max_failures=MAX_FAILURES)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"job": job},
        torch_config=torch_config(gpu), scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=gpu),
        run_config=run,
        datasets={"train": shards.to_dataset(x["train"], y["train"], blocks=max(2, cfg.workers * 2),
                                      seed=cfg.seed if job.stream else None),
                  "val": shards.to_dataset(x["val"], y["val"], blocks=1)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "head.pt"), map_location="cpu", weights_only=True)
    return result.return_value, loc.to_uri(result.checkpoint.path), state
