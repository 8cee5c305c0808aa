"""The training core every fit shares: optimizer groups, minibatches, validation, early stopping.

The Ray Train fit (`fit.py`), the many-heads sweep (`probe.py`) and fine-tuning all train with
these pieces, so a head follows the same rules whichever of them trains it: what weight decay
applies to, how an epoch is batched, what "better" means on val, and which state is kept.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

MIN_DELTA = 1e-5  # how much lower a val loss must be to count as better
VAL_BATCH = 8192  # rows per forward when validating
MOMENT_ROWS = 8192  # rows per chunk when computing the train mean and std (two float64 chunks at a time)


STD_FLOOR = 0.1  # no feature is scaled up more than 1 / STD_FLOOR times as far as the median feature


def standardisation(x: np.ndarray, *, chunk_rows: int = MOMENT_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Train mean and std per feature in float64, a chunk at a time; constant features keep a std of 1."""
    # Chunked: numpy's x.std() makes a float64 copy of all of x, twice the features again on the
    # driver (10 GB at 1M rows × 1,280 dims).
    chunks = range(0, len(x), chunk_rows)
    mean = sum(x[i : i + chunk_rows].sum(0, dtype=np.float64) for i in chunks) / len(x)
    var = sum(np.square(x[i : i + chunk_rows] - mean).sum(0) for i in chunks) / len(x)
    std = np.sqrt(var)
    constant = std < 1e-6
    # A channel that barely varies on train (a ReLU unit that almost never fires on this data) would be
    # scaled up a thousandfold, so that its rare firing on a val or test image becomes a 1,000-sigma
    # input: measured on shifted Fashion-MNIST, features of std 3e-5 against a median of 0.04, val
    # inputs at 1,411 sigma and log-probabilities of -146.
    floor = STD_FLOOR * np.median(std[~constant]) if not constant.all() else 0.0
    std = np.where(constant, 1.0, np.maximum(std, floor))
    return mean.astype(np.float32), std.astype(np.float32)


def decayed(module: nn.Module) -> list[nn.Parameter]:
    """Trainable weights that weight decay applies to: matrices and kernels, not biases or norm scales."""
    return [p for p in module.parameters() if p.requires_grad and p.ndim > 1]


def param_groups(module: nn.Module, *, lr: float, weight_decay: float) -> list[dict]:
    """Optimizer groups of one module at its own lr: its decayed weights, then the rest undecayed."""
    # One call per module (a head, a block of the backbone), so each can have its own lr.
    decay = decayed(module)
    ids = {id(p) for p in decay}
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": rest, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def cosine(opt: torch.optim.Optimizer, *, epochs: int, rows: int, batch_size: int):
    """Cosine decay of every group's lr over all the steps of the run, stepped once per batch."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(rows / batch_size))


def minibatches(rows: int, *, batch_size: int, generator: torch.Generator, device) -> Iterator[torch.Tensor]:
    """One epoch of shuffled row indices in batches (the last one may be short)."""
    # Drawn on the CPU generator, so the order is the same on every device.
    order = torch.randperm(rows, generator=generator).to(device)
    for i in range(math.ceil(rows / batch_size)):
        yield order[i * batch_size : (i + 1) * batch_size]


def step(loss: torch.Tensor, *, opt: torch.optim.Optimizer, sched) -> None:
    """One optimizer step on `loss`, then one of the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


@torch.no_grad()
def validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = VAL_BATCH) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the model's logits on held-out rows, in eval mode."""
    # In batches: at 1,000 classes the logits of a 100k-row val split alone would take 400 MB.
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i : i + batch_size])
        loss += nn.functional.cross_entropy(logits, y[i : i + batch_size], reduction="sum").item()
        correct += int((logits.argmax(1) == y[i : i + batch_size]).sum().item())
    return loss / len(y), correct / len(y)


class EarlyStopping:
    """Validates after each epoch into a history, keeps the state of the best epoch on val, says when to stop.

    Best is the lowest val loss, or with `monitor="accuracy"` the highest val accuracy (the lower loss
    breaking a tie): fine-tuning chooses on paired val accuracy (ftl.finetune.selection), and an epoch
    that gets more val images right while it grows more confident on the ones it misses has a higher
    loss. Measured on Fashion-MNIST's last stage (benchmarks/finetune_gain.py, from a probe trained on
    one scale for all features): val accuracy rose from 0.775 to 0.797 in 10 epochs and no epoch came
    below the probe's val loss, so keeping by loss kept the probe."""

    def __init__(self, patience: int, *, monitor: str = "loss"):
        self.patience, self.waited, self.best_loss = patience, 0, math.inf
        self.monitor, self.best_accuracy = monitor, -math.inf
        self.epoch, self.state, self.history = -1, None, []

    def observe(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epoch: int, train_loss: float,
                lr: float) -> bool:
        """Record one epoch; True once `patience` epochs in a row brought no better one."""
        val_loss, val_accuracy = validate(model, x, y)
        self.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                             "val_accuracy": val_accuracy, "lr": lr})
        lower = val_loss < self.best_loss - MIN_DELTA
        if self.monitor == "accuracy":
            better = val_accuracy > self.best_accuracy or (val_accuracy == self.best_accuracy and lower)
        else:
            better = lower
        if better:
            self.best_loss, self.best_accuracy, self.epoch, self.waited = val_loss, val_accuracy, epoch, 0
            self.state = copy.deepcopy(model.state_dict())
        else:
            self.waited += 1
        return self.waited >= self.patience

    def best(self, model: nn.Module) -> dict:
        """The kept state; the model's last one if the val loss was never finite."""
        return self.state if self.state is not None else copy.deepcopy(model.state_dict())

    def state_dict(self) -> dict:
        """Everything a resumed training needs to stop where this one would have (ftl.fitting.state stores it)."""
        return {"patience": self.patience, "waited": self.waited, "best_loss": self.best_loss, "epoch": self.epoch,
                "state": self.state, "history": self.history, "monitor": self.monitor,
                "best_accuracy": self.best_accuracy}

    def load_state_dict(self, saved: dict) -> None:
        self.patience, self.waited, self.best_loss = saved["patience"], saved["waited"], saved["best_loss"]
        self.monitor = saved.get("monitor", "loss")  # a checkpoint from before the key kept by loss
        self.best_accuracy = saved.get("best_accuracy", -math.inf)
        self.epoch, self.state, self.history = saved["epoch"], saved["state"], list(saved["history"])
