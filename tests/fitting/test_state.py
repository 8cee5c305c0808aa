"""Resumable state as tensors and JSON: what a training saves comes back equal, and nothing else is stored."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ftl.finetune.resume import ResumeState
from ftl.fitting import core, state


def trained_a_little():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    opt = torch.optim.AdamW(net.parameters(), lr=0.01, betas=(0.9, 0.99))
    ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [ramp, core.cosine(opt, epochs=3, rows=8, batch_size=4)],
                                                  milestones=[2])
    stop = core.EarlyStopping(patience=2)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for epoch in range(3):
        core.step(torch.nn.functional.cross_entropy(net(x), y), opt=opt, sched=sched)
        stop.observe(net, x, y, epoch=epoch, train_loss=math.nan if epoch == 0 else 1.0, lr=sched.get_last_lr()[0])
    return net, opt, sched, stop


def test_a_training_state_round_trips(tmp_path):
    net, opt, sched, stop = trained_a_little()
    p = ResumeState(candidate=1, done=[{"blocks": ["features.17"], "epoch": 2, "val_loss": 0.5, "history": []}],
                    best={"index": 0, "state": net.state_dict()},
                    current={"epoch": 3, "stopped": False, "net": net.state_dict(), "opt": opt.state_dict(),
                             "sched": sched.state_dict(), "stop": stop.state_dict()})
    state.save(p.state_dict(), str(tmp_path))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    json.loads((tmp_path / "state.json").read_text())  # plain JSON: nothing a loader would execute

    back = ResumeState()
    back.load_state_dict(state.load(str(tmp_path)))
    assert back.candidate == 1 and back.done == p.done and back.resumed_at == "candidate 1, epoch 3"
    for k, v in net.state_dict().items():
        assert torch.equal(back.current["net"][k], v) and torch.equal(back.best["state"][k], v)
    # The optimizer and schedule load into fresh ones and continue exactly where they were.
    net2, opt2, sched2, stop2 = trained_a_little()
    opt2.load_state_dict(back.current["opt"])
    sched2.load_state_dict(back.current["sched"])
    stop2.load_state_dict(back.current["stop"])
    assert list(opt2.state_dict()["state"]) == list(opt.state_dict()["state"])  # integer keys kept
    assert opt2.state_dict()["param_groups"][0]["betas"] == (0.9, 0.99)
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
    assert stop2.epoch == stop.epoch and stop2.best_loss == stop.best_loss and stop2.waited == stop.waited
    assert math.isnan(stop2.history[0]["train_loss"])


def test_anything_but_tensors_and_json_is_refused(tmp_path):
    with pytest.raises(TypeError, match="only tensors and JSON values"):
        state.save({"hook": object()}, str(tmp_path))


def test_shared_storage_is_stored_as_copies(tmp_path):
    w = torch.randn(4, 4)
    state.save({"a": w, "tied": w, "view": w[1:]}, str(tmp_path))
    back = state.load(str(tmp_path))
    assert torch.equal(back["a"], w) and torch.equal(back["tied"], w) and torch.equal(back["view"], w[1:])


class Table(torch.nn.Module):
    """Logits looked up by row: an epoch's predictions set by hand."""

    def __init__(self):
        super().__init__()
        self.register_buffer("logits", torch.zeros(4, 2))

    def forward(self, x):
        return self.logits[x.long()]


@pytest.mark.parametrize("monitor, kept", [("loss", 0), ("accuracy", 1)])
def test_the_kept_epoch_is_the_best_by_what_is_monitored(monitor, kept):
    x, y = torch.arange(4.0), torch.tensor([0, 0, 1, 1])
    epochs = [torch.tensor([[1.0, 0], [1, 0], [0.2, 0], [0.2, 0]]),  # 2 of 4 right, the misses unsure: low loss
              torch.tensor([[1.0, 0], [1, 0], [0, 1], [9, 0]])]  # 3 of 4 right, one miss sure of itself
    model, stop = Table(), core.EarlyStopping(patience=5, monitor=monitor)
    for epoch, logits in enumerate(epochs):
        model.logits.copy_(logits)
        stop.observe(model, x, y, epoch=epoch, train_loss=1.0, lr=0.1)
    (first, second) = stop.history
    assert first["val_loss"] < second["val_loss"] and first["val_accuracy"] < second["val_accuracy"]
    assert stop.epoch == kept and torch.equal(stop.best(model)["logits"], epochs[kept])
