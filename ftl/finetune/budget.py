"""`finetune.budget_minutes`: the training time of all candidates together, kept across a resumed run.

An epoch is not started when the last one's duration says it would end past the budget, and a
candidate is not started when its first epoch would not fit: so the budget bounds training time
to within one epoch, and the cheap candidates, which `auto` tries first, are the ones that run.
The first epoch of the first candidate always runs (nothing is known about its cost before).
"""

from __future__ import annotations

import time

import torch

from ftl.config import FinetuneConfig
from ftl.finetune.resume import ResumeState
from ftl.fitting.workers import all_reduce


def allows(cfg: FinetuneConfig, p: ResumeState) -> bool:
    """Whether one more epoch, as long as the last, ends within the budget (always, without a budget).

    The workers' clocks differ by a little: the minimum over the group decides, so all stop together."""
    if cfg.budget_minutes is None:
        return True
    fits = torch.tensor([float(p.spent + p.epoch_seconds <= cfg.budget_minutes * 60)])
    return bool(all_reduce(fits, op="min").item())


class Epoch:
    """Times one epoch into the resumable state: `with Epoch(p): ...`."""

    def __init__(self, p: ResumeState):
        self.p = p

    def __enter__(self):
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        took = time.perf_counter() - self.started
        self.p.spent += took
        self.p.epoch_seconds = took
        return False
