"""Splits and metrics: the pure parts of training, checked against their definitions and scikit-learn."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ftl.fitting import evaluate, features


def table(n: int, split=None) -> pa.Table:
    return pa.table({"image_id": [f"img{i}" for i in range(n)], "split": pa.array(split or [None] * n, pa.string())})


def test_hash_split_is_stratified_deterministic_and_seeded():
    labels = np.repeat(np.arange(4), 50)
    a, source, carved, unsplit = features.assign_splits(table(200), labels, val_fraction=0.1, test_fraction=0.2, seed=0)
    b = features.assign_splits(table(200), labels, val_fraction=0.1, test_fraction=0.2, seed=0).assigned
    c = features.assign_splits(table(200), labels, val_fraction=0.1, test_fraction=0.2, seed=1).assigned
    assert (source, carved, unsplit) == ("hash", [], 200) and (a == b).all() and not (a == c).all()
    for k in range(4):
        got = a[labels == k]
        assert ((got == "test").sum(), (got == "val").sum(), (got == "train").sum()) == (10, 5, 35)


def test_split_column_is_followed_and_missing_val_is_carved_from_train():
    labels = np.tile(np.arange(2), 50)
    given = ["test"] * 20 + ["train"] * 80
    out, source, carved, unsplit = features.assign_splits(table(100, given), labels, val_fraction=0.25,
                                                          test_fraction=0.2, seed=0)
    assert (source, carved, unsplit) == ("column+hash", ["val"], 0)
    assert (out[:20] == "test").all() and (out[20:] != "test").all()
    assert (out == "val").sum() == 20 and (out == "train").sum() == 60
    out, source, carved, unsplit = features.assign_splits(table(4, ["train", "val", "test", "train"]),
                                                          np.array([0, 1, 0, 1]), val_fraction=0.1,
                                                          test_fraction=0.1, seed=0)
    assert (source, carved, unsplit) == ("column", [], 0) and list(out) == ["train", "val", "test", "train"]


def test_metrics_agree_with_scikit_learn():
    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 300)
    proba = rng.dirichlet(np.ones(6), 300)
    proba[np.arange(150), y[:150]] += 2  # half of them right
    proba /= proba.sum(1, keepdims=True)
    got = evaluate.metrics(evaluate.from_proba(proba, y))
    pred = proba.argmax(1)
    assert np.isclose(got["accuracy"], sk.accuracy_score(y, pred))
    assert np.isclose(got["macro_f1"], sk.f1_score(y, pred, average="macro"))
    assert np.isclose(got["mean_per_class_accuracy"], sk.balanced_accuracy_score(y, pred))
    assert np.isclose(got["log_loss"], sk.log_loss(y, proba))
    assert np.isclose(got["top5_accuracy"], sk.top_k_accuracy_score(y, proba, k=5))
    four = proba[:, :4] / proba[:, :4].sum(1, keepdims=True)
    assert "top5_accuracy" not in evaluate.metrics(evaluate.from_proba(four, y % 4))
    # Batch by batch, the outcome is the same as in one go: nothing depends on where a batch ends.
    small = evaluate.from_proba(proba, y, batch_size=7)
    assert evaluate.metrics(small) == got and (small.rank == evaluate.from_proba(proba, y).rank).all()
    report = evaluate.report(evaluate.from_proba(proba, y), [f"c{i}" for i in range(6)])
    assert report.splitlines()[1].startswith("c0") and f"{got['accuracy']:.3f}" in report.splitlines()[-1]
    cm = evaluate.confusion(evaluate.from_proba(proba, y))
    np.testing.assert_array_equal(cm, sk.confusion_matrix(y, pred, labels=range(6)))
