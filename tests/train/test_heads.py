"""Heads fitted with Ray Train on real Fashion-MNIST MobileNetV2 features: quality and worker counts;
the training core's rules (what weight decay applies to, which state early stopping keeps)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from ftl.config import TrainConfig
from ftl.errors import TrainError
from ftl.fitting import core, evaluate, features
from ftl.io import storage
from ftl.model import heads
from ftl.train import fit, memory
from tests.conftest import BUCKET

C_GRID = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]


@pytest.fixture(scope="module")
def data(fmnist_features) -> features.FeatureData:
    return features.load(str(fmnist_features / "features"), layer="flatten", val_fraction=0.1, test_fraction=0.2)


def accuracy(head, data, split="test") -> float:
    return evaluate.metrics(evaluate.outcome(head, data.x[split], data.y[split]))["accuracy"]


def test_linear_head_matches_tuned_sklearn_logistic_regression(data, ray_runtime, s3_server):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(data.x["train"])
    xs = {s: scaler.transform(data.x[s]) for s in features.SPLITS}
    scores = []
    for c in C_GRID:
        lr = LogisticRegression(C=c, max_iter=5000).fit(xs["train"], data.y["train"])
        val = lr.predict_proba(xs["val"])
        scores.append((lr.score(xs["val"], data.y["val"]), -log_loss(data.y["val"], val, labels=range(10)),
                       lr.score(xs["test"], data.y["test"]), c))
    _, _, sk_test, sk_c = max(scores)

    # The same objective: sklearn's C·Σ CE + ½‖W‖² is mean CE + ½·wd‖W‖² with wd = 1 / (C·n).
    n = len(data.y["train"])
    cfg = TrainConfig(optimizer="lbfgs", weight_decay=[1 / (c * n) for c in C_GRID], epochs=25, patience=5)
    # Checkpoints go to S3 (the moto server), through Ray Train's storage_filesystem.
    fitted = fit.fit(cfg, data.x, data.y, classes=len(data.classes), storage_path=f"s3://{BUCKET}/checkpoints",
                     run_name="lbfgs")
    ours = accuracy(fitted.head, data)
    assert ours >= sk_test - 0.005, (ours, sk_test, sk_c, fitted.best)
    assert len(fitted.sweep) == len(C_GRID) and ours > 0.6
    assert fitted.checkpoint.startswith(f"s3://{BUCKET}/checkpoints/lbfgs/")
    loc = storage.locate(fitted.checkpoint)
    assert loc.fs.exists(f"{loc.path}/head.pt")


def test_two_workers_match_one(data, ray_runtime, tmp_path):
    cfg = {"head": "mlp", "hidden": [64], "dropout": 0.0, "optimizer": "adamw", "epochs": 30, "batch_size": 32,
           "lr": 3e-3, "weight_decay": 1e-2, "label_smoothing": 0.1, "class_weights": "balanced", "patience": 30}
    one = fit.fit(TrainConfig(**cfg, workers=1), data.x, data.y, classes=10, storage_path=str(tmp_path), run_name="w1")
    two = fit.fit(TrainConfig(**cfg, workers=2), data.x, data.y, classes=10, storage_path=str(tmp_path), run_name="w2")
    acc1, acc2 = accuracy(one.head, data), accuracy(two.head, data)
    assert acc1 > 0.6 and abs(acc1 - acc2) <= 0.05, (acc1, acc2)
    assert abs(one.best["val_loss"] - two.best["val_loss"]) <= 0.1 * one.best["val_loss"], (one.best, two.best)
    assert (one.workers, two.workers) == (1, 2) and len(two.history) == 30
    # Standardisation is baked into the head: raw features in, the train mean and std inside.
    np.testing.assert_allclose(two.head.mean.numpy(), data.x["train"].mean(0), rtol=1e-4, atol=1e-5)


def test_adamw_streams_train_through_ray_data_with_two_workers(data, ray_runtime, tmp_path):
    cfg = TrainConfig(optimizer="adamw", epochs=20, batch_size=32, lr=3e-3, weight_decay=1e-2, patience=20, workers=2)
    streamed = fit.fit(cfg, data.x, data.y, classes=10, storage_path=str(tmp_path), run_name="s2", stream=True)
    assert streamed.streamed and len(streamed.history) == 20 and accuracy(streamed.head, data) > 0.6
    assert streamed.peak_rss > 0 and streamed.estimate > 0


def test_lbfgs_that_cannot_fit_says_so_with_the_numbers_and_adamw_streams(ray_runtime):
    dim, share = 1280, memory.budget(1)[0]
    rows = 2 * share // (dim * memory.FLOAT)  # twice what a worker may hold, whatever this machine has free
    shape = {"rows": rows, "val_rows": 1000, "dim": dim, "classes": 1000}
    with pytest.raises(TrainError) as e:
        memory.decide(TrainConfig(optimizer="lbfgs"), **shape)
    message = str(e.value)
    assert f"must hold its {rows:,} train rows × 1,280 dims × 4 bytes = {memory.gib(rows * dim * 4)} GiB" in message
    need, available = (float(v) for v in re.search(r"about ([\d.]+) GiB per worker, but a worker may use ([\d.]+) GiB",
                                                   message).groups())
    assert need > available and "Use train.optimizer=adamw" in message
    stream, estimate, budget = memory.decide(TrainConfig(optimizer="adamw"), **shape)
    assert stream and estimate.streamed < budget < estimate.held
    assert memory.decide(TrainConfig(optimizer="lbfgs"), **{**shape, "rows": 10_000})[0] is False


def shapes(groups: list[dict]) -> list[list[tuple]]:
    return [[tuple(p.shape) for p in g["params"]] for g in groups]


def test_param_groups_decay_weights_not_biases_and_skip_frozen_parameters():
    head = heads.Head(4, 3, hidden=[5])
    groups = core.param_groups(head, lr=0.1, weight_decay=0.01)
    assert shapes(groups) == [[(5, 4), (3, 5)], [(5,), (3,)]]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.1, 0.01), (0.1, 0.0)]
    head.net[0].requires_grad_(False)  # a frozen block, as fine-tuning leaves early backbone stages
    assert shapes(core.param_groups(head, lr=0.1, weight_decay=0.01)) == [[(3, 5)], [(3,)]]


def test_early_stopping_keeps_the_lowest_val_loss_and_stops_after_patience():
    model = torch.nn.Linear(1, 2)
    x, y = torch.ones(4, 1), torch.zeros(4, dtype=torch.long)
    stop = core.EarlyStopping(patience=2)
    stopped = []
    # The bias of class 0 sets the val loss: 2.0 is the best epoch, then two worse ones use up the patience.
    for epoch, bias in enumerate([1.0, 2.0, 1.5, 1.9]):
        with torch.no_grad():
            model.weight.zero_()
            model.bias.copy_(torch.tensor([bias, 0.0]))
        stopped.append(stop.observe(model, x, y, epoch=epoch, train_loss=0.0, lr=0.1))
    assert stopped == [False, False, False, True]
    assert stop.epoch == 1 and [h["epoch"] for h in stop.history] == [0, 1, 2, 3]
    assert stop.best(model)["bias"].tolist() == [2.0, 0.0] and model.bias[0].item() == pytest.approx(1.9)
    assert all(h["val_accuracy"] == 1.0 for h in stop.history) and not model.training


def test_linear_lbfgs_grid_as_a_warm_path_chooses_as_cold_fits_in_fewer_passes(data):
    """A linear head is convex: starting each weight decay from the stronger one's head changes where the fits
    end only within the tolerance, so the same point of the grid wins, with the same test accuracy."""
    n = len(data.y["train"])
    cfg = TrainConfig(optimizer="lbfgs", weight_decay=[1 / (c * n) for c in C_GRID], epochs=25, patience=5,
                      use_gpu=False)
    fits = {path: fit.fit(cfg, data.x, data.y, classes=len(data.classes), storage_path="/tmp/ftl-path-test",
                          run_name=f"path-{path}", lbfgs_path=path, lbfgs_tolerance=None if path else 1e-9)
            for path in (True, False)}
    passes = {path: sum(r["passes_run"] for r in f.sweep) for path, f in fits.items()}  # loss evaluations, all fits
    assert fits[True].best["weight_decay"] == fits[False].best["weight_decay"], (fits[True].sweep, fits[False].sweep)
    assert abs(accuracy(fits[True].head, data) - accuracy(fits[False].head, data)) <= 1 / len(data.y["test"]) + 1e-9
    assert [r["weight_decay"] for r in fits[True].sweep] == cfg.weight_decay  # reported in the workflow's order
    assert passes[True] < passes[False], passes  # here 280 against 462; 2.9 s against 8.3 s on benchmarks/train.py


def test_standardisation_scales_no_feature_up_past_ten_times_the_median_feature():
    """A unit that barely varies on train must not turn its rare firing at test time into a 1,000-sigma input."""
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 1, 5000), rng.normal(3, 2, 5000), rng.normal(0, 1e-5, 5000), np.full(5000, 7.0),
                  rng.normal(0, 0.5, 5000)], axis=1).astype(np.float32)
    mean, std = core.standardisation(x, chunk_rows=1000)
    assert np.allclose(mean, x.mean(0), atol=1e-4)
    assert std[0] == pytest.approx(1, rel=0.05) and std[1] == pytest.approx(2, rel=0.05)  # untouched
    assert std[3] == 1.0  # constant: left as it is
    # The varying features' median spread (of about 1, 2, 0.5 and 1e-5): the near-dead one gets a tenth of it.
    floor = core.STD_FLOOR * np.median(x[:, [0, 1, 2, 4]].std(0))
    assert floor == pytest.approx(0.075, rel=0.05) and std[2] == pytest.approx(floor, rel=1e-4)
    assert std[4] == pytest.approx(0.5, rel=0.05)
    z = (np.float32(1e-3) - mean[2]) / std[2]  # a firing a hundred times its train spread: 0.01 sigma, not 100
    assert abs(z) < 0.1
