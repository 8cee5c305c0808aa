"""`ftl predict` end to end: a model `ftl run` registered, applied through a workflow's predict: section,
`--set` overrides and the shortcut flags, on Ray Data, with a real MLflow server."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ftl import config
from ftl.cli import main
from tests.conftest import write_workflow
from tests.support import tables

ROOT = Path(__file__).resolve().parents[2]


def pyfunc_predictions(model_uri: str, uris: list[str]) -> pd.DataFrame:
    """What the registered pyfunc model says about each image, indexed by uri."""
    import mlflow.pyfunc

    # The served model reads only where its operator allows; these tests' images are all it needs.
    allowed = {str(Path(u).parent.parent) for u in uris}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTL_MODEL_URI_PREFIXES", ",".join(sorted(allowed)))
        got = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"uri": uris}))
    return got.set_index(pd.Index(uris, name="uri"))


def predictions(out: Path) -> pd.DataFrame:
    return tables.frame(out / "predictions").set_index("uri").sort_index()


def assert_agrees_with_pyfunc(pred: pd.DataFrame, model_uri: str, k: int) -> None:
    """Image by image: the same label and probability as the pyfunc model, and k consistent top classes."""
    expected = pyfunc_predictions(model_uri, list(pred.index)).loc[pred.index]
    assert pred["image_id"].is_unique
    assert (pred["label"] == expected["label"]).all(), (pred["label"], expected["label"])
    np.testing.assert_allclose(pred["probability"], expected["probability"], rtol=1e-4, atol=1e-5)
    top_labels, top_p = np.stack(pred["top_labels"]), np.stack(pred["top_probabilities"])
    assert top_labels.shape == (len(pred), k) and (top_labels[:, 0] == pred["label"]).all()
    np.testing.assert_allclose(top_p[:, 0], pred["probability"])
    assert (np.diff(top_p, axis=1) <= 0).all()


def test_workflow_predict_section_agrees_with_the_pyfunc_model_and_a_rerun_skips(tmp_path, fmnist, registered_model,
                                                                                capsys):
    out = tmp_path / "pred"
    wf = write_workflow(tmp_path / "predict.yaml", name="predict",
                        predict={"model": registered_model, "input": str(fmnist / "test"), "output": str(out),
                                 "top_k": 3})
    assert main(["predict", str(wf)]) == 0
    summary = capsys.readouterr().out
    assert f"model {registered_model}: listed 100 = 0 already done + 100 predicted + 0 quarantined" in summary
    # Settings come from ftl.pipeline.tuning, as extract's do: the test runtime has 2 CPUs, no GPU.
    assert "ran on cpu: 1 actor(s) x batch 64, decode by PIL in CPU tasks" in summary
    pred = predictions(out)
    assert len(pred) == 100 and tables.read(out / "quarantine").num_rows == 0
    assert_agrees_with_pyfunc(pred, registered_model, k=3)
    assert (pred["label"] == pred.index.map(lambda u: Path(u).parent.name)).mean() > 0.6

    assert main(["predict", str(wf)]) == 0  # a rerun finds every image done and writes nothing
    assert "listed 100 = 100 already done + 0 predicted + 0 quarantined" in capsys.readouterr().out
    assert len(predictions(out)) == 100


def test_set_and_flags_override_the_workflow_and_device_decode_agrees(tmp_path, fmnist, registered_model, capsys):
    wf = write_workflow(tmp_path / "predict.yaml", name="predict",
                        predict={"model": "models:/no-such-model/1", "input": str(fmnist / "val"),
                                 "output": str(tmp_path / "from-file")})
    latest = registered_model.rsplit("/", 1)[0] + "/latest"  # what the shipped workflows name
    args = ["predict", str(wf), "--set", f"predict.model={latest}", "--set", "predict.top_k=2",
            "--set", "predict.decode=device", "--set", f"predict.output={tmp_path / 'from-set'}",
            "--output", str(tmp_path / "from-flag"), "--batch-size", "16"]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert "listed 60 = 0 already done + 60 predicted + 0 quarantined" in summary
    assert "ran on cpu: 1 actor(s) x batch 16, decode by torchvision.io on cpu" in summary
    # The flags come last: they beat --set, which beats the file.
    assert not (tmp_path / "from-file").exists() and not (tmp_path / "from-set").exists()
    assert_agrees_with_pyfunc(predictions(tmp_path / "from-flag"), registered_model, k=2)


def test_shortcut_flags_alone_quarantine_bad_images_and_a_rerun_does_only_new_ones(tmp_path, fmnist,
                                                                                   registered_model, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    bags = sorted((fmnist / "test" / "bag").glob("*.png"))
    for p in bags[:3]:
        shutil.copy(p, inputs / p.name)
    (inputs / "broken.png").write_bytes(b"not an image")
    (inputs / "empty.png").write_bytes(b"")
    out = tmp_path / "o"
    args = ["predict", "--model", registered_model, "--input", str(inputs), "--output", str(out), "--top-k", "3"]
    assert main(args) == 0
    assert "listed 5 = 0 already done + 3 predicted + 2 quarantined" in capsys.readouterr().out
    q = tables.frame(out / "quarantine").sort_values("uri")
    assert [Path(u).name for u in q["uri"]] == ["broken.png", "empty.png"] and (q["stage"] == "decode").all()
    assert q["error"].str.len().gt(0).all()
    assert_agrees_with_pyfunc(predictions(out), registered_model, k=3)

    shutil.copy(bags[3], inputs / bags[3].name)  # one new image: only it is predicted
    assert main(args) == 0
    assert "listed 6 = 5 already done + 1 predicted + 0 quarantined" in capsys.readouterr().out
    pred = predictions(out)
    assert sorted(Path(u).name for u in pred.index) == sorted(p.name for p in bags[:4])
    assert_agrees_with_pyfunc(pred, registered_model, k=3)
    assert len(tables.frame(out / "quarantine")) == 2


def test_an_image_over_max_image_bytes_is_quarantined_unread(tmp_path, fmnist, registered_model, capsys):
    from PIL import Image

    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sorted((fmnist / "test" / "coat").glob("*.png"))[:2]:
        shutil.copy(p, inputs / p.name)  # under 1 kB each
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(inputs / "huge.png")  # about 200 kB: noise does not compress
    args = ["predict", "--model", registered_model, "--input", str(inputs), "--output", str(tmp_path / "o"),
            "--set", "predict.max_image_bytes=50000"]
    assert main(args) == 0
    assert "listed 3 = 0 already done + 2 predicted + 1 quarantined" in capsys.readouterr().out
    q = tables.frame(tmp_path / "o" / "quarantine")
    assert [Path(u).name for u in q["uri"]] == ["huge.png"]
    assert q["error"][0].startswith("TooBig:") and "max_image_bytes=50000" in q["error"][0]


def test_errors_name_the_key_and_the_fix(tmp_path, fmnist, registered_model, capsys):
    def error(*args) -> str:
        assert main(["predict", *args]) == 2
        return capsys.readouterr().err

    err = error()
    assert "predict: required key is missing" in err and "--model M --input I --output O" in err
    extract_only = write_workflow(tmp_path / "extract.yaml", source={"uri": str(fmnist)}, extract={"output": "o"})
    assert "predict: required key is missing" in error(str(extract_only))
    err = error(str(extract_only), "--set", "predict.model=m")
    assert "predict.input: required key is missing" in err and "predict.output: required key is missing" in err
    err = error("--model", "m", "--input", "i", "--output", "o", "--set", "predict.topk=3")
    assert "predict.topk: unknown key" in err and "top_k" in err and "decode" in err
    err = error("--model", "models:/no-such-model/1", "--input", str(fmnist / "test"), "--output", str(tmp_path / "x"))
    assert "predict.model: cannot load model models:/no-such-model/1" in err and "Set predict.model to" in err
    err = error("--model", registered_model, "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "x"))
    assert f"predict.input {tmp_path / 'missing'} does not exist" in err and "set predict.input to" in err
    assert not (tmp_path / "x").exists()


def test_a_predict_only_workflow_needs_no_source_or_extract(tmp_path, capsys):
    wf = write_workflow(tmp_path / "p.yaml", predict={"model": "models:/m/1", "input": "in", "output": "out"})
    assert main(["show", str(wf)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["predict"]["top_k"] == 5 and shown["predict"]["batch_size"] is None  # tuning fills it
    assert shown["source"] is None and shown["extract"] is None
    assert main(["extract", str(wf)]) == 2  # the stages that read them still require them
    err = capsys.readouterr().err
    assert "source: required key is missing" in err and "extract: required key is missing" in err
    for name in ("predict.yaml", "quickstart.yaml"):
        shipped = config.load_workflow(ROOT / "workflows" / name, needs=("predict",))
        assert shipped.predict.model.startswith("models:/") and shipped.predict.top_k == 3


@pytest.mark.parametrize("flag", ["--top-k=0", "--batch-size=0"])
def test_flags_are_validated_like_the_keys_they_set(flag, capsys):
    assert main(["predict", "--model", "m", "--input", "i", "--output", "o", flag]) == 2
    assert f"predict.{flag[2:].split('=')[0].replace('-', '_')}:" in capsys.readouterr().err


def test_an_output_written_by_one_model_refuses_another_naming_both(tmp_path, fmnist, registered_model, capsys):
    """Predictions of two models in one folder would be read as one model's: the second is refused."""
    import mlflow.artifacts
    from safetensors.numpy import load_file, save_file

    other = Path(mlflow.artifacts.download_artifacts(registered_model, dst_path=str(tmp_path / "download")))
    [weights] = other.rglob("head.safetensors")
    save_file({k: v * 1.5 for k, v in load_file(weights).items()}, weights)  # the same model folder, another head
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sorted((fmnist / "test" / "bag").glob("*.png"))[:2]:
        shutil.copy(p, inputs / p.name)
    out = tmp_path / "o"
    assert main(["predict", "--model", registered_model, "--input", str(inputs), "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(other), "--input", str(inputs), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds predictions of another model" in err and registered_model in err and str(other) in err
    assert len(predictions(out)) == 2  # untouched


def test_an_alias_runs_the_version_it_names_and_the_summary_and_output_say_which(tmp_path, fmnist,
                                                                                   registered_model, capsys):
    """`models:/name@alias` is pinned to its version before loading: moving the alias later changes nothing."""
    import json

    import mlflow

    name, version = registered_model.removeprefix("models:/").split("/")
    mlflow.MlflowClient().set_registered_model_alias(name, "predict-test", version)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sorted((fmnist / "test" / "coat").glob("*.png"))[:3]:
        shutil.copy(p, inputs / p.name)
    out = tmp_path / "o"
    asked = f"models:/{name}@predict-test"
    assert main(["predict", "--model", asked, "--input", str(inputs), "--output", str(out)]) == 0
    summary = capsys.readouterr().out
    assert f"model models:/{name}/{version} ({asked}): listed 3 = 0 already done + 3 predicted" in summary
    assert "quarantine:" not in summary  # nothing was quarantined, so no path to a folder that does not exist
    identity = json.loads((out / "_ftl.json").read_text())
    assert identity["model_uri"] == asked and identity["model_version"] == f"models:/{name}/{version}"
    assert len(predictions(out)) == 3
