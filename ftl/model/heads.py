"""Classification heads on features, with the train-set standardisation baked in."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Head(nn.Module):
    """features → standardise (train-set mean/std) → linear or MLP → logits."""

    def __init__(self, dim: int, classes: int, *, hidden: list[int] = (), dropout: float = 0.0,
                 mean: np.ndarray | None = None, std: np.ndarray | None = None):
        super().__init__()
        self.config = {"dim": dim, "classes": classes, "hidden": list(hidden), "dropout": dropout}
        self.register_buffer("mean", torch.as_tensor(mean if mean is not None else np.zeros(dim), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std if std is not None else np.ones(dim), dtype=torch.float32))
        layers, width = [], dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class Probabilities(nn.Module):
    """The head as it is logged: logits → class probabilities."""

    def __init__(self, head: Head):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(x), dim=1)


def build(config: dict, state: dict | None = None) -> Head:
    """A head from its config dict, loaded with `state` when given."""
    head = Head(config["dim"], config["classes"], hidden=config["hidden"], dropout=config["dropout"])
    if state is not None:
        head.load_state_dict(state)
    return head


def class_weights(y: np.ndarray, classes: int, how: str) -> np.ndarray | None:
    """'balanced': n / (classes * count), as scikit-learn defines it."""
    if how == "none":
        return None
    counts = np.bincount(y, minlength=classes).astype(np.float64)
    return (len(y) / (classes * np.maximum(counts, 1))).astype(np.float32)
