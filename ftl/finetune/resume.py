"""Fine-tuning's resumable state: one object, saved and restored in one place, as tensors and JSON.

A checkpoint per epoch holds the finished candidates, the best one's weights, and the candidate
in training (its net, optimizer, schedule and early stopping), so a rerun after a kill, or a
restarted worker group, picks up at the epoch after the last checkpoint.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

from ftl.fitting import state


@dataclass
class ResumeState:
    """What a checkpoint holds: finished candidates, the best one's state, and the one in training."""

    candidate: int = 0
    done: list[dict] = field(default_factory=list)
    best: dict | None = None  # {"index", "state"} of the best finished candidate
    current: dict | None = None  # {"epoch", "stopped", "net", "opt", "sched", "stop"}
    finished: bool = False
    skipped: list[int] = field(default_factory=list)  # candidates finetune.budget_minutes left out
    spent: float = 0.0  # seconds of training epochs so far, across restarts (ftl.finetune.budget)
    epoch_seconds: float = 0.0  # the last epoch's
    resumed_at: str | None = None  # where a restored run picks up; never saved

    def state_dict(self) -> dict:
        return {"candidate": self.candidate, "done": self.done, "best": self.best, "current": self.current,
                "finished": self.finished, "skipped": self.skipped, "spent": self.spent,
                "epoch_seconds": self.epoch_seconds}

    def load_state_dict(self, saved: dict) -> None:
        self.candidate, self.done, self.best = saved["candidate"], list(saved["done"]), saved["best"]
        self.current, self.finished = saved["current"], saved["finished"]
        # A checkpoint from before the budget was recorded has spent nothing yet.
        self.skipped, self.spent = list(saved.get("skipped", [])), saved.get("spent", 0.0)
        self.epoch_seconds = saved.get("epoch_seconds", 0.0)
        where = f"epoch {self.current['epoch']}" if self.current else "a finished candidate"
        self.resumed_at = "the end (training was done)" if self.finished else f"candidate {self.candidate}, {where}"


def save(p: ResumeState, *, rank: int, metrics: dict) -> None:
    """Report an epoch to Ray Train; rank 0 attaches the checkpoint (the others hold the same state)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            state.save(p.state_dict(), tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def restore() -> ResumeState:
    """The state of this run's last checkpoint, or a fresh one."""
    import ray.train

    p = ResumeState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            p.load_state_dict(state.load(d))
    return p


def kept(folder: str) -> dict:
    """The best candidate's weights from a finished run's checkpoint folder."""
    return state.load(folder)["best"]["state"]
