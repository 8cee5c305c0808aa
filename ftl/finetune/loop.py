"""The Ray Train loop of fine-tuning: every candidate range of blocks from the probe, early stopping on val,
a checkpoint per epoch, and a resumed run picking up at the epoch after its last checkpoint.

Each worker streams its shard of train (pixels, or the frozen prefix's output) every epoch, holds
val whole (so every worker takes the same early-stopping decision, as in ftl.train.fit), and
trains with DDP (gloo on CPU, NCCL on GPUs) under bf16 autocast on GPUs. Epoch 0 is the probe
itself, validated before any step: the run starts where the linear probe ended. The training
rules (parameter groups, cosine schedule, optimizer step, early stopping) are ftl.fitting.core's.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ftl import logs
from ftl.config import FinetuneConfig
from ftl.finetune import blocks as blockmod
from ftl.finetune import budget, data, network, selection
from ftl.finetune.job import FinetuneJob
from ftl.finetune.resume import ResumeState, restore, save
from ftl.fitting import core, live
from ftl.fitting.workers import all_reduce
from ftl.io import schema
from ftl.pipeline import allocator


@dataclass
class Session:
    """What one worker holds for the whole run."""

    cfg: FinetuneConfig
    net: network.Finetuned
    chunked: network.Chunked  # the net evaluated in chunks: what core.validate and EarlyStopping see
    device: torch.device
    column: str
    classes: np.ndarray
    rank: int
    world: int
    transform: object | None
    xv: torch.Tensor = None
    yv: torch.Tensor = None
    xt: torch.Tensor | None = None  # test, read on rank 0 when first needed
    yt: torch.Tensor | None = None
    test_ids: list[str] | None = None
    unreadable: int = 0


def autocast_for(cfg: FinetuneConfig, device: torch.device):
    """bf16 autocast on GPUs (precision auto or bf16), nothing on CPUs, where autocast costs more than it saves."""
    bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def read_split(s: Session, name: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A whole split into host memory: inputs, class indices, image ids (readable rows only)."""
    import ray.train

    xs, ys, ids = [], [], []
    for batch in ray.train.get_dataset_shard(name).iter_batches(batch_size=1024, batch_format="numpy"):
        x, y, bad = data.batch_tensors(batch, column=s.column, classes=s.classes)
        xs.append(x)
        ys.append(y)
        ids += batch["image_id"][batch["error"] == schema.ERROR_NONE].tolist()
        s.unreadable += bad
    return torch.cat(xs), torch.cat(ys), ids


def train_epoch(s: Session, model: nn.Module, *, opt, sched, seed: int) -> dict:
    """One pass over this worker's shard; the totals summed over all workers."""
    import time

    import ray.train

    model.train()
    totals = torch.zeros(4, dtype=torch.float64)  # loss × rows, correct, rows, unreadable
    started = time.perf_counter()
    shard = ray.train.get_dataset_shard("train")
    per_worker = max(1, s.cfg.batch_size // s.world)
    batches = shard.iter_batches(batch_size=per_worker, batch_format="numpy", local_shuffle_seed=seed,
                                 local_shuffle_buffer_size=max(s.cfg.shuffle_buffer, per_worker))
    for step, batch in enumerate(batches):
        x, y, bad = data.batch_tensors(batch, column=s.column, classes=s.classes)
        if s.transform is not None:
            x = data.augment(x, s.transform, seed=seed * 100_003 + step)
        x, y = x.to(s.device, non_blocking=True), y.to(s.device)
        with autocast_for(s.cfg, s.device)():
            logits = model(x).float()
        loss = nn.functional.cross_entropy(logits, y)
        core.step(loss, opt=opt, sched=sched)
        totals += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y), bad])
    totals = all_reduce(totals.to(s.device)).cpu()
    rows = max(totals[2].item(), 1.0)
    return {"train_loss": totals[0].item() / rows, "train_accuracy": totals[1].item() / rows,
            "images_per_second": rows / (time.perf_counter() - started), "unreadable": totals[3].item()}


def optimizer(s: Session, trained: list[str], order: list[str], rows: int):
    """AdamW over the head and the trained blocks (ftl.finetune.blocks): linear warmup, then core's cosine schedule."""
    cfg = s.cfg
    groups = blockmod.param_groups(s.net.backbone, s.net.head, blocks=trained, order=order, lr=cfg.lr,
                                   backbone_lr=cfg.backbone_lr, layer_decay=blockmod.layer_decay(cfg, trained, order),
                                   weight_decay=cfg.weight_decay)
    opt = torch.optim.AdamW(groups)
    rows, per_worker = math.ceil(rows / s.world), max(1, cfg.batch_size // s.world)
    warm = min(cfg.warmup_epochs, cfg.epochs - 1)
    if not warm:
        return opt, core.cosine(opt, epochs=cfg.epochs, rows=rows, batch_size=per_worker)
    steps = warm * math.ceil(rows / per_worker)
    ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=steps)
    decay = core.cosine(opt, epochs=cfg.epochs - warm, rows=rows, batch_size=per_worker)
    return opt, torch.optim.lr_scheduler.SequentialLR(opt, [ramp, decay], milestones=[steps])


def candidate(s: Session, p: ResumeState, *, trained: list[str], order: list[str], rows: int, initial: dict,
              on_epoch=None) -> dict:
    """Train one range of blocks from the probe (or from its checkpoint) until early stopping; its summary."""
    s.chunked.load_state_dict(initial)
    s.net.set_trainable(trained)
    model = s.net
    if s.world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(s.net, move_to_device=False)
    opt, sched = optimizer(s, trained, order, rows)
    stop = core.EarlyStopping(s.cfg.patience, monitor=s.cfg.monitor)
    first = 1
    if p.current:  # resumed: this candidate's state as its last checkpoint left it
        s.chunked.load_state_dict(p.current["net"])
        opt.load_state_dict(p.current["opt"])
        sched.load_state_dict(p.current["sched"])
        stop.load_state_dict(p.current["stop"])
        first = s.cfg.epochs + 1 if p.current["stopped"] else p.current["epoch"] + 1
    else:  # epoch 0: the probe before any step, validated like every epoch
        stop.observe(s.chunked, s.xv, s.yv, epoch=0, train_loss=math.nan, lr=0.0)
    out_of_budget = False
    for epoch in range(first, s.cfg.epochs + 1):
        if epoch > 1 and not budget.allows(s.cfg, p):  # every candidate that starts trains one epoch at least
            out_of_budget = True
            break
        seed = ((s.cfg.seed * 1009 + p.candidate) * 10_007 + epoch) * 101 + s.rank  # a new shuffle per epoch
        with budget.Epoch(p):
            row = train_epoch(s, model, opt=opt, sched=sched, seed=seed % 2**31)
            stopped = stop.observe(s.chunked, s.xv, s.yv, epoch=epoch, train_loss=row.pop("train_loss"),
                                   lr=sched.get_last_lr()[0])
        stop.history[-1].update(row)
        if on_epoch:
            on_epoch(stop.history[-1])
        p.current = {"epoch": epoch, "stopped": stopped, "net": s.chunked.state_dict(), "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "stop": stop.state_dict()}
        save(p, rank=s.rank, metrics={"candidate": p.candidate, **stop.history[-1]})
        allocator.trim()  # the epoch's batches and its checkpoint's buffers are freed: return their pages
        if stopped:
            break
    kept = next((h for h in stop.history if h["epoch"] == stop.epoch), stop.history[-1])
    state = stop.best(s.chunked)
    s.chunked.load_state_dict(state)
    return {"blocks": trained, "epoch": stop.epoch, "val_loss": kept["val_loss"],
            "val_accuracy": kept["val_accuracy"], "history": stop.history, "state": state,
            "out_of_budget": out_of_budget,
            "val_correct": correct(s),  # per val image, for the paired comparison with the probe (finetune.selection)
            "test_correct": correct(s, test=True)}  # reported per candidate, never chosen on


def session(job: FinetuneJob) -> Session:
    """The worker's device, threads and network (the probe's backbone and head), and its augmentation."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = job.finetune
    allocator.release_freed_memory()  # this worker may have inherited the model actors' settings
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # Ray sets one thread per worker; the node's cores are shared by its workers instead
        torch.set_num_threads(cfg.torch_threads or max(1, len(os.sched_getaffinity(0)) // ctx.get_local_world_size()))
    torch.manual_seed(cfg.seed)
    column = job.column
    net = network.build(job.spec, ray.get(job.states), inputs=column).to(device)
    transform = (data.augmenter(job.spec.crop, cfg.crop_scale, cfg.augment) if cfg.augment and column == data.PIXELS
                 else None)
    return Session(cfg=cfg, net=net, device=device, column=column, transform=transform,
                   chunked=network.Chunked(net, batch_size=256, device=device, autocast=autocast_for(cfg, device)),
                   classes=np.array(job.classes, dtype=object), rank=ctx.get_world_rank(),
                   world=ctx.get_world_size())


def correct(s: Session, *, test: bool = False) -> list[int]:
    """1 for each val (or test) image the network in its current state gets right, else 0.

    Test is read once, on rank 0 (the others answer []): each candidate's test accuracy beside the
    probe's is what the MLflow child runs and benchmarks/finetune_gain.py report. Selection only sees val."""
    if test and s.rank != 0:
        return []
    if test and s.xt is None:
        s.xt, s.yt, s.test_ids = read_split(s, "test")
    x, y = (s.xt, s.yt) if test else (s.xv, s.yv.cpu())
    return (logits(s, x).argmax(1) == y.numpy()).astype(np.int8).tolist()


def logits(s: Session, x: torch.Tensor) -> np.ndarray:
    s.chunked.eval()
    with torch.no_grad():
        return s.chunked(x).cpu().numpy()


def train_loop(config: dict) -> dict | None:
    """Runs on every Ray Train worker: each candidate in turn, the best kept on val, then val and test once."""
    job: FinetuneJob = config["job"]
    cfg = job.finetune
    logs.own_progress()
    s = session(job)
    initial = copy.deepcopy(s.chunked.state_dict())
    p = restore()
    phase = (lambda what: live.tell(job.progress, phase=what)) if s.rank == 0 else (lambda what: None)
    phase("workers started: reading val into memory")
    s.xv, yv, _ = read_split(s, "val")
    s.yv = yv.to(s.device)
    phase(f"validating the probe on {len(yv):,} val images, then reading test")
    probe_correct = correct(s)  # the probe, before any step (the state every candidate starts from)
    probe_test = correct(s, test=True)
    phase("training the first candidate's first epoch")
    candidates = job.candidates
    for index in range(p.candidate, len(candidates)):
        if p.done and not budget.allows(cfg, p):  # finetune.budget_minutes: later candidates are left out
            p.skipped.append(index)
            p.candidate = index + 1
            continue
        # Epochs count from 1 here: epoch 0 is the probe itself. Rank 0 speaks for all (same val, same decision).
        on_epoch = live.reporter(job.progress if s.rank == 0 else None, first_epoch=1, epochs=cfg.epochs,
                                 fit=index + 1, fits=len(candidates), what="candidate",
                                 note=f"blocks {blockmod.describe(candidates[index], job.order)}")
        spent = p.spent
        summary = candidate(s, p, trained=candidates[index], order=job.order, rows=job.rows,
                            initial=initial, on_epoch=on_epoch)
        summary["seconds"] = p.spent - spent  # its epochs in this attempt (a resumed one counts from the restart)
        state = summary.pop("state")
        # The state kept is the best candidate's by finetune.selection's rule: one that beats the probe by
        # the margin before one that does not, then the best on val.
        if p.best is None or selection.key(probe_correct, summary, margin=cfg.margin_se) > selection.key(
                probe_correct, p.done[p.best["index"]], margin=cfg.margin_se):
            p.best = {"index": index, "state": state}
        p.done.append(summary)
        p.candidate, p.current = index + 1, None
    if not p.finished:
        p.finished = True
        save(p, rank=s.rank, metrics={"candidate": p.best["index"], **p.done[p.best["index"]]["history"][-1]})
    choice = selection.select(probe_correct, p.done, margin=cfg.margin_se)
    # The probe kept: val and test are the probe's, as the model stays the probe.
    s.chunked.load_state_dict(initial if choice.kept_probe else p.best["state"])
    if s.rank != 0:
        return None
    if s.xt is None:
        s.xt, s.yt, s.test_ids = read_split(s, "test")
    return {"val": {"logits": logits(s, s.xv), "y": yv.numpy()},
            "test": {"logits": logits(s, s.xt), "y": s.yt.numpy(), "image_id": s.test_ids},
            "candidates": [{k: v for k, v in c.items() if k not in ("val_correct", "test_correct")} for c in p.done],
            "chosen": choice.index, "kept_probe": choice.kept_probe, "skipped": p.skipped,
            "selection": selection.on_test(choice.rows, p.done, probe_test),
            "device": str(s.device), "resumed_at": p.resumed_at,
            "unreadable": s.unreadable}
