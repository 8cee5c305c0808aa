"""What the driver hands every head-fitting worker: one typed value, not a dict of keys."""

from __future__ import annotations

from dataclasses import dataclass

from ftl.config import TrainConfig


@dataclass(frozen=True)
class HeadJob:
    train: TrainConfig
    head: dict  # ftl.model.heads.build's config: dim, classes, hidden, dropout
    initial: dict  # the head's initial state, the same for every worker and every weight decay
    class_weights: list[float] | None
    stream: bool  # train read through Ray Data every epoch (it does not fit held)
    rows: dict[str, int]  # train and val rows in all
    lbfgs_iters: int  # L-BFGS iterations per reported epoch
    progress: object  # the Epochs actor (ftl.fitting.live) rank 0 tells, or None
    lbfgs_path: bool = True  # a linear head's weight decays as a warm-started path (ftl.train.worker)
    lbfgs_tolerance: float | None = None  # L-BFGS's gradient tolerance; None: worker.LBFGS_TOLERANCE_GRAD
