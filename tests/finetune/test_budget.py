"""finetune.budget_minutes: which epoch is started, kept across a resumed run's checkpoint."""

from __future__ import annotations

import time

from ftl.config.finetune import FinetuneConfig
from ftl.finetune import budget
from ftl.finetune.resume import ResumeState


def test_an_epoch_starts_only_when_one_as_long_as_the_last_ends_within_the_budget():
    p = ResumeState(spent=50.0, epoch_seconds=9.0)
    assert budget.allows(FinetuneConfig(budget_minutes=1), p)  # 59 s ≤ 60 s
    p.epoch_seconds = 11.0
    assert not budget.allows(FinetuneConfig(budget_minutes=1), p)
    assert budget.allows(FinetuneConfig(), ResumeState(spent=1e9, epoch_seconds=1e9))  # no budget: no limit


def test_epochs_add_up_and_survive_a_checkpoint():
    p = ResumeState()
    for _ in range(2):
        with budget.Epoch(p):
            time.sleep(0.05)
    assert 0.1 <= p.spent < 1.0 and 0.05 <= p.epoch_seconds < p.spent
    p.skipped = [2]
    again = ResumeState()
    again.load_state_dict(p.state_dict())
    assert (again.spent, again.epoch_seconds, again.skipped) == (p.spent, p.epoch_seconds, [2])
    legacy = {k: v for k, v in p.state_dict().items() if k not in ("spent", "epoch_seconds", "skipped")}
    older = ResumeState()
    older.load_state_dict(legacy)  # a checkpoint from before the budget: nothing spent yet
    assert (older.spent, older.skipped) == (0.0, [])
