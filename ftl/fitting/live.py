"""Progress of a training: epoch i of N (of which fit, when there are several), val accuracy, elapsed and ETA.

`ftl train` and `ftl finetune` train inside Ray Train workers: rank 0 tells a small Ray actor
(`Epochs`) after every epoch, fire and forget, and the driver's `ftl.pipeline.progress.Progress`
polls it, as it polls extraction's counts. `ftl sweep` trains its heads in the driver, so there
the same object is a plain one. A worker that cannot reach it loses a line, never the fit.
"""

from __future__ import annotations

import time

from ftl.pipeline.progress import Progress, fmt_seconds, tell

__all__ = ["Epochs", "line", "reporter", "tell", "training"]


class Epochs:
    """Where a training is: the last state a worker told, and when the first epoch ended."""

    def __init__(self):
        self.state: dict = {}
        self.first: tuple[float, int] | None = None  # (time, epochs done) at the first report

    def update(self, **state) -> None:
        self.state.update(state)
        if self.first is None and state.get("epochs"):  # a phase told before the first epoch starts no clock
            self.first = (time.monotonic(), done(self.state))

    def snapshot(self) -> dict:
        out = dict(self.state)
        if self.first is not None:  # the rate excludes starting the workers: ETA counts from the first epoch
            out["rate_seconds"], out["rate_epochs"] = time.monotonic() - self.first[0], done(self.state) - self.first[1]
        return out


def done(s: dict) -> int:
    """Epochs done over all fits, counting every fit as its full budget."""
    return (s.get("fit", 1) - 1) * s.get("epochs", 0) + s.get("epoch", 0)


def line(stage: str, s: dict, total, seconds: float) -> str:
    """`train: epoch 12/100 of weight decay 2/5, val accuracy 0.8420, 14s elapsed, ETA about 1m05s if no early stop`."""
    if not s.get("epochs"):  # before the first epoch: what the workers said they are doing, if they did
        return f"{stage}: {s.get('phase', 'starting the workers')}, {fmt_seconds(seconds)} elapsed"
    head = f"{stage}: epoch {s['epoch']}/{s['epochs']}"
    if s.get("fits", 1) > 1:
        head += f" of {s.get('what', 'fit')} {s['fit']}/{s['fits']}"
    parts = [head] + ([s["note"]] if s.get("note") else [])
    if s.get("val_accuracy") is not None:
        parts.append(f"val accuracy {s['val_accuracy']:.4f}")
    parts.append(f"{fmt_seconds(seconds)} elapsed")
    left = s.get("fits", 1) * s["epochs"] - done(s)
    if left > 0 and s.get("rate_epochs", 0) > 0:
        # Every epoch left at the pace so far: early stopping usually ends sooner, and a slower epoch
        # (a loaded machine, a bigger candidate) later; an estimate, not a bound.
        parts.append(f"ETA about {fmt_seconds(s['rate_seconds'] / s['rate_epochs'] * left)} if no early stop")
    return ", ".join(parts)


def training(stage: str, *, remote: bool = True, stream=None, interactive: bool | None = None) -> Progress:
    """The progress of one training; pass `.handle` to whoever trains, which calls `tell(handle, ...)`."""
    return Progress(stage, total=None, counter=Epochs, render=line, remote=remote, stream=stream,
                    interactive=interactive)


def reporter(handle, *, first_epoch: int = 0, **told):
    """A callback for each epoch's history row: tells `handle` the epoch (from 1), its val accuracy, and `told`."""
    if handle is None:
        return None
    return lambda row: tell(handle, **told, epoch=row["epoch"] + 1 - first_epoch, val_accuracy=row.get("val_accuracy"))
