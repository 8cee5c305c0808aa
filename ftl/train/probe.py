"""Many heads in one pass over cached features: every layer × lr × weight decay trained at once.

Why this, and not Ray Tune over Ray Train trials: a trial here is a linear (or small MLP) head
on features that already fit in memory, so its cost is a few matrix products per batch. A Ray
Tune trial would start a worker group and re-read the features for each of them, and that
overhead, not the training, would dominate (seconds per trial against milliseconds of work).
As DINOv2's linear evaluation does, every head reads the same shuffled minibatch stream: each
step gathers one batch of rows for all layers and updates all heads with one AdamW optimizer,
one parameter group per head carrying its own lr and weight decay. Heads share no parameters,
so summing their losses keeps their gradients independent, and the comparison is fair: same
initialisation seed, same batches, same schedule. It runs in the calling process, on CUDA
when that process has it; the features are standardised once per layer, not once per head.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ftl.model import heads


@dataclass
class Trial:
    """One head: its layer and hyper-parameters, its kept (lowest val loss) state and history."""

    layer: str
    lr: float
    weight_decay: float
    head: heads.Head
    epoch: int = -1
    history: list[dict] = field(default_factory=list)
    best_loss: float = math.inf
    waited: int = 0
    state: dict | None = None


def pick_device(device: str = "auto") -> torch.device:
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def fit_heads(x: dict[str, np.ndarray], y: np.ndarray, xv: dict[str, np.ndarray], yv: np.ndarray, *,
              classes: int, lrs: list[float], weight_decays: list[float], hidden: list[int] = (),
              dropout: float = 0.0, epochs: int, batch_size: int, patience: int, label_smoothing: float = 0.0,
              seed: int = 0, device: str = "auto") -> list[Trial]:
    """Train a head per layer (x: layer → train rows) × lr × weight decay; each keeps its best val-loss epoch."""
    dev = pick_device(device)
    z, zv, trials = {}, {}, []
    for layer, rows in x.items():
        mean, std = heads.standardisation(rows)
        z[layer] = torch.from_numpy((rows - mean) / std).to(dev)
        zv[layer] = torch.from_numpy((xv[layer] - mean) / std).to(dev)
        for lr in lrs:
            for wd in weight_decays:
                torch.manual_seed(seed)  # the same initial head for every grid point of a layer
                head = heads.Head(rows.shape[1], classes, hidden=hidden, dropout=dropout, mean=mean, std=std)
                trials.append(Trial(layer=layer, lr=lr, weight_decay=wd, head=head.to(dev)))
    opt = torch.optim.AdamW(param_groups(trials))
    steps = math.ceil(len(y) / batch_size)
    # The cosine factor is the same for every group, so each head keeps its own lr's shape.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    yt, yvt = torch.from_numpy(y).to(dev), torch.from_numpy(yv).to(dev)
    gen = torch.Generator().manual_seed(seed)
    active = list(trials)
    for epoch in range(epochs):
        for t in active:
            t.head.train()
        totals = torch.zeros(len(active), device=dev)
        order = torch.randperm(len(y), generator=gen).to(dev)
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            batch = {layer: rows[idx] for layer, rows in z.items()}
            losses = torch.stack([loss_fn(t.head.net(batch[t.layer]), yt[idx]) for t in active])
            # Stopped heads keep grad None, so AdamW leaves them (and their weight decay) alone.
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            sched.step()
            totals += losses.detach() * len(idx)
        factor = opt.param_groups[0]["lr"] / trials[0].lr
        for t, total in zip(active, (totals / len(y)).tolist()):
            observe(t, epoch, total, zv[t.layer], yvt, lr=t.lr * factor)
        active = [t for t in active if t.waited < patience]
        if not active:
            break
    for t in trials:
        t.head.load_state_dict(t.state)
        t.head = t.head.cpu().eval()
        t.state = None
    return trials


def param_groups(trials: list[Trial]) -> list[dict]:
    """One group of decayed weights and one of biases per head, with the head's lr."""
    groups = []
    for t in trials:
        decayed = {id(p) for p in t.head.decayed()}
        groups.append({"params": list(t.head.decayed()), "lr": t.lr, "weight_decay": t.weight_decay})
        groups.append({"params": [p for p in t.head.parameters() if id(p) not in decayed], "lr": t.lr,
                       "weight_decay": 0.0})
    return groups


def observe(t: Trial, epoch: int, train_loss: float, zv: torch.Tensor, yv: torch.Tensor, *, lr: float) -> None:
    """Val loss and accuracy after an epoch; keep the state when val loss improved (early stopping)."""
    t.head.eval()
    with torch.no_grad():
        logits = t.head.net(zv)
        val_loss = nn.functional.cross_entropy(logits, yv).item()
        val_acc = (logits.argmax(1) == yv).float().mean().item()
    t.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc,
                      "lr": lr})
    if val_loss < t.best_loss - 1e-5 or t.state is None:
        t.best_loss, t.waited, t.epoch = val_loss, 0, epoch
        t.state = copy.deepcopy(t.head.state_dict())
    else:
        t.waited += 1
