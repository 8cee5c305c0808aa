"""Workflow validation: every error names its exact path and the valid choices."""

from __future__ import annotations

import pytest
import yaml

from ftl import config
from ftl.cli import main
from tests.conftest import write_workflow

BASE = {"source": {"uri": "data"}, "extract": {"output": "out"}}


def load(tmp_path, overrides=(), **sections):
    path = write_workflow(tmp_path / "wf.yaml", **{**BASE, **sections})
    return config.load_workflow(path, list(overrides))


def test_defaults_fill_in(tmp_path):
    wf = load(tmp_path)
    assert wf.extract.backbone == "mobilenet_v2" and wf.extract.pooling == "avg" and wf.extract.layers == []


def test_unknown_key_names_path_and_valid_keys(tmp_path):
    with pytest.raises(config.WorkflowError) as e:
        load(tmp_path, extract={"output": "out", "batchsize": 3})
    msg = str(e.value)
    assert "extract.batchsize: unknown key" in msg
    assert "batch_size" in msg and "pooling" in msg


def test_bad_value_names_list_index_and_choices(tmp_path):
    with pytest.raises(config.WorkflowError) as e:
        load(tmp_path, extract={"output": "out", "layers": ["flatten", ["nested"]], "pooling": "mean"})
    msg = str(e.value)
    assert "extract.layers[1]:" in msg
    assert "extract.pooling:" in msg and "'avg', 'max', 'avgmax', 'cls', 'patch_avg' or 'cls_patch_avg'" in msg


def test_missing_required_key(tmp_path):
    path = write_workflow(tmp_path / "wf.yaml", source={"uri": "x"}, extract={})
    with pytest.raises(config.WorkflowError, match=r"extract\.output: required key is missing"):
        config.load_workflow(path)


def test_set_overrides_any_key_and_parses_yaml_values(tmp_path):
    wf = load(tmp_path, ["extract.batch_size=7", "extract.layers=[features.14, flatten]",
                         "extract.preprocess.crop=96", "storage.options.endpoint_url=http://x"])
    assert wf.extract.batch_size == 7
    assert wf.extract.layers == ["features.14", "flatten"]
    assert wf.extract.preprocess.crop == 96
    assert wf.storage.options == {"endpoint_url": "http://x"}


def test_set_override_is_validated(tmp_path):
    with pytest.raises(config.WorkflowError, match=r"extract\.batch_size"):
        load(tmp_path, ["extract.batch_size=-1"])
    with pytest.raises(config.WorkflowError, match="key.path=value"):
        load(tmp_path, ["extract.batch_size"])


def test_show_prints_resolved_workflow_with_secrets_masked(tmp_path, capsys):
    path = write_workflow(tmp_path / "wf.yaml", **BASE, storage={"options": {"key": "AKIA123", "secret": "s3cr3t"}})
    assert main(["show", str(path), "--set", "extract.batch_size=5"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["extract"]["batch_size"] == 5
    assert resolved["extract"]["max_error_fraction"] == 0.05  # defaults are shown
    assert "AKIA123" not in out and "s3cr3t" not in out
    assert resolved["storage"]["options"] == {"key": "***", "secret": "***"}
    assert resolved["source"]["label_key"] == "cls"  # only credential names are masked


def test_show_prints_the_weights_and_tracking_uri_a_run_will_use(tmp_path, capsys, monkeypatch):
    """DEFAULT and an empty tracking.uri are shown as what they stand for, and the output runs as it reads."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://ml:hunter2@mlflow.example:5000")
    path = write_workflow(tmp_path / "wf.yaml", **BASE, sweep={"backbones": [
        {"backbone": "mobilenet_v2", "weights": "DEFAULT"}, {"backbone": "resnet50", "weights": "IMAGENET1K_V1"}]})
    assert main(["show", str(path), "--set", "extract.weights=DEFAULT"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["tracking"]["uri"] == "https://ml:***@mlflow.example:5000" and "hunter2" not in out
    assert resolved["extract"]["weights"] == "MobileNet_V2_Weights.IMAGENET1K_V2"
    assert [b["weights"] for b in resolved["sweep"]["backbones"]] == ["MobileNet_V2_Weights.IMAGENET1K_V2",
                                                                       "IMAGENET1K_V1"]
    assert "extract.weights is for the other commands" in out
    shown = tmp_path / "shown.yaml"
    shown.write_text(out)
    assert main(["show", str(shown)]) == 0 and yaml.safe_load(capsys.readouterr().out) == resolved


def test_cli_reports_config_errors_with_exit_code(tmp_path, capsys):
    path = write_workflow(tmp_path / "wf.yaml", **BASE, extrakt={})
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert "extrakt: unknown key" in err and "extract" in err


def test_a_listing_that_does_not_fit_the_source_s_format_says_which_does(tmp_path):
    for source, expected in (({"format": "s3_inventory", "listing": "driver"}, "set source.listing to auto"),
                             ({"format": "webdataset", "listing": "distributed"}, "listed by its shards"),
                             ({"root": "s3://bucket/images"}, "source.root is for format: s3_inventory")):
        path = write_workflow(tmp_path / "wf.yaml", source={"uri": "s3://bucket/x", **source},
                              extract={"output": "out"})
        with pytest.raises(config.WorkflowError, match=r"source: .*" + expected):
            config.load_workflow(path)


def test_nested_aliases_that_expand_to_millions_are_refused(tmp_path, capsys):
    lines = ["name: bomb", 'a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert "aliases expand to 12,345,687 values" in err and "write the values out" in err


def test_an_anchor_used_twice_is_fine(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("name: anchors\nsource: {uri: /data}\n"
                    "extract: {output: /out, layers: &layers [features.14, features.18]}\n"
                    "sweep: {backbones: [{backbone: mobilenet_v2, weights: DEFAULT, layers: *layers}]}\n")
    wf = config.load_workflow(path, [], needs=())
    assert wf.sweep.backbones[0].layers == wf.extract.layers == ["features.14", "features.18"]
