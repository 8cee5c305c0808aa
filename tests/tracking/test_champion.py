"""The `champion` alias: set on what ftl registers, moved only by a score at least as good, usable as a model URI."""

from __future__ import annotations

import pytest

from ftl.cli import main
from ftl.errors import TrackingError
from ftl.tracking import champion
from tests.support import tables


def test_registered_pair_is_champion_and_predict_takes_it(tmp_path, fmnist, registered_model, mlflow_server, capsys):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    name, version = registered_model.removeprefix("models:/").split("/")
    image, head = client.get_model_version_by_alias(name, "champion"), client.get_model_version_by_alias(
        f"{name}-head", "champion")
    assert (image.version, head.version) == (version, version)
    train_run = client.get_run(image.tags["ftl.train_run"])
    assert float(image.tags["ftl.val_accuracy"]) == pytest.approx(train_run.data.metrics["val/accuracy"], abs=1e-6)

    out = tmp_path / "pred"
    assert main(["predict", "--model", f"models:/{name}@champion", "--input", str(fmnist / "test"),
                 "--output", str(out)]) == 0
    # The alias is pinned to the version it names, and the summary names both.
    assert (f"model models:/{name}/{version} (models:/{name}@champion): listed 100 = 0 already done + 100 predicted"
            in capsys.readouterr().out)
    assert len(tables.frame(out / "predictions")) == 100


def test_a_version_takes_the_alias_only_with_a_score_at_least_the_champions(registered_model, mlflow_server):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    name = "champion-rule"  # versions of the registered model's files, under a name of this test's own
    v = client.get_model_version(*registered_model.removeprefix("models:/").split("/"))
    client.create_registered_model(name)
    first, worse, better = (client.create_model_version(name, v.source, run_id=v.run_id,
                                                      model_id=v.source.removeprefix("models:/")).version
                            for _ in range(3))

    assert "is now version" in champion.promote(name, first, val_accuracy=0.8)  # no champion yet: it takes it
    note = champion.promote(name, worse, val_accuracy=0.7)
    assert client.get_model_version_by_alias(name, "champion").version == first
    assert f"stays version {first}" in note and client.get_model_version(name, worse).tags["ftl.val_accuracy"]
    assert champion.pin(f"models:/{name}@champion") == f"models:/{name}/{first}"

    assert "is now version" in champion.promote(name, better, val_accuracy=0.8)  # a tie moves it: the newer wins
    assert client.get_model_version_by_alias(name, "champion").version == better
    assert champion.pin(f"models:/{name}@champion/MLmodel") == f"models:/{name}/{better}/MLmodel"
    assert champion.pin(f"models:/{name}/2") == f"models:/{name}/2"
    assert champion.pin(f"models:/{name}/latest") == f"models:/{name}/{max(int(first), int(worse), int(better))}"
    assert mlflow.pyfunc.load_model(f"models:/{name}@champion").metadata.run_id == \
        client.get_model_version(name, better).run_id
    with pytest.raises(TrackingError, match="cannot resolve models:/no-such-model@champion"):
        champion.pin("models:/no-such-model@champion")
