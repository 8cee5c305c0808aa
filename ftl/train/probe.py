"""Many heads in one pass over cached features: every layer × lr × weight decay trained at once.

Why this, and not Ray Tune over Ray Train trials: a trial here is a linear (or small MLP) head
on features that already fit in memory, so its cost is a few matrix products per batch. A Ray
Tune trial would start a worker group and re-read the features for each of them, and that
overhead, not the training, would dominate (seconds per trial against milliseconds of work).
As DINOv2's linear evaluation does, every head reads the same shuffled minibatch stream: each
step gathers one batch of rows for all layers and updates all heads with one AdamW optimizer,
whose parameter groups (`core.param_groups`, per head) carry each head's lr and weight decay.
Heads share no parameters, so summing their losses keeps their gradients independent, and the
comparison is fair: same initialisation seed, same batches, same schedule. It runs in the calling process, on CUDA
when that process has it; the features are standardised once per layer, not once per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ftl.fitting import core
from ftl.model import heads


@dataclass
class Trial:
    """One trained head: its layer and hyper-parameters, its kept (lowest val loss) epoch and its history."""

    layer: str
    lr: float
    weight_decay: float
    head: heads.Head
    epoch: int
    history: list[dict]


@dataclass
class Running:
    """A head while it trains, with its own early stopping."""

    layer: str
    lr: float
    weight_decay: float
    head: heads.Head
    stop: core.EarlyStopping


def pick_device(device: str = "auto") -> torch.device:
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def fit_heads(x: dict[str, np.ndarray], y: np.ndarray, xv: dict[str, np.ndarray], yv: np.ndarray, *,
              classes: int, lrs: list[float], weight_decays: list[float], hidden: list[int] = (),
              dropout: float = 0.0, epochs: int, batch_size: int, patience: int, label_smoothing: float = 0.0,
              seed: int = 0, device: str = "auto", on_epoch=None) -> list[Trial]:
    """Train a head per layer (x: layer → train rows) × lr × weight decay; each keeps its best val-loss epoch.

    `on_epoch(epoch, training, best)` hears after each epoch: heads still training, best val accuracy so far.
    """
    dev = pick_device(device)
    z, zv, runs = {}, {}, []
    for layer, rows in x.items():
        mean, std = core.standardisation(rows)
        z[layer] = torch.from_numpy((rows - mean) / std).to(dev)
        zv[layer] = torch.from_numpy((xv[layer] - mean) / std).to(dev)
        for lr in lrs:
            for wd in weight_decays:
                torch.manual_seed(seed)  # the same initial head for every grid point of a layer
                head = heads.Head(rows.shape[1], classes, hidden=hidden, dropout=dropout, mean=mean, std=std)
                runs.append(Running(layer=layer, lr=lr, weight_decay=wd, head=head.to(dev),
                                    stop=core.EarlyStopping(patience)))
    train_all(runs, z=z, y=torch.from_numpy(y).to(dev), zv=zv, yv=torch.from_numpy(yv).to(dev), epochs=epochs,
              batch_size=batch_size, label_smoothing=label_smoothing, seed=seed, on_epoch=on_epoch)
    trials = []
    for r in runs:
        # The heads trained on standardised rows (their `net`); the kept state is the net's.
        r.head.net.load_state_dict(r.stop.best(r.head.net))
        trials.append(Trial(layer=r.layer, lr=r.lr, weight_decay=r.weight_decay, head=r.head.cpu().eval(),
                            epoch=r.stop.epoch, history=r.stop.history))
    return trials


def train_all(runs: list[Running], *, z: dict[str, torch.Tensor], y: torch.Tensor, zv: dict[str, torch.Tensor],
              yv: torch.Tensor, epochs: int, batch_size: int, label_smoothing: float, seed: int,
              on_epoch=None) -> None:
    """One AdamW over all heads on one minibatch stream, until every head has stopped or epochs run out."""
    opt = torch.optim.AdamW([group for r in runs
                             for group in core.param_groups(r.head, lr=r.lr, weight_decay=r.weight_decay)])
    # The cosine factor is the same for every group, so each head keeps its own lr's shape.
    sched = core.cosine(opt, epochs=epochs, rows=len(y), batch_size=batch_size)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    gen = torch.Generator().manual_seed(seed)
    active = list(runs)
    for epoch in range(epochs):
        for r in active:
            r.head.train()
        totals = torch.zeros(len(active), device=y.device)
        for idx in core.minibatches(len(y), batch_size=batch_size, generator=gen, device=y.device):
            batch = {layer: rows[idx] for layer, rows in z.items()}
            losses = torch.stack([loss_fn(r.head.net(batch[r.layer]), y[idx]) for r in active])
            # Stopped heads keep grad None, so AdamW leaves them (and their weight decay) alone.
            core.step(losses.sum(), opt=opt, sched=sched)
            totals += losses.detach() * len(idx)
        factor = opt.param_groups[0]["lr"] / runs[0].lr
        still = []
        for r, total in zip(active, (totals / len(y)).tolist()):
            if not r.stop.observe(r.head.net, zv[r.layer], yv, epoch=epoch, train_loss=total, lr=r.lr * factor):
                still.append(r)
        active = still
        if on_epoch:
            on_epoch(epoch + 1, len(active), max(max(h["val_accuracy"] for h in r.stop.history) for r in runs))
        if not active:
            break
