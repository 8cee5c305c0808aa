"""What the MLflow UI shows of an ftl workflow, through the very REST calls its pages make."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request


def call(base: str, path: str, body: dict | None = None) -> dict:
    """GET (or POST `body` to) the UI's ajax API, as the browser does."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def test_the_experiment_page_opens_on_its_training_runs_and_the_model_on_its_champion(registered_model, mlflow_server):
    with urllib.request.urlopen(mlflow_server, timeout=30) as page:
        assert page.status == 200 and b"<html" in page.read(2000).lower()

    # The experiment page: the experiment by name (its kind picks the training-runs view), then its runs.
    exp = call(mlflow_server, "experiments/get-by-name?experiment_name=predictable")["experiment"]
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    runs = call(mlflow_server, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100,
                                               "run_view_type": "ACTIVE_ONLY",
                                               "order_by": ["attributes.start_time DESC"]})["runs"]
    stages = {t["value"]: r for r in runs for t in r["data"].get("tags", []) if t["key"] == "ftl.stage"}
    assert {"extract", "train"} <= set(stages)
    train = stages["train"]
    metrics = {m["key"]: m["value"] for m in train["data"]["metrics"]}
    assert 0 < metrics["val/accuracy"] <= 1 and 0 < metrics["test/accuracy"] <= 1
    assert train["inputs"]["dataset_inputs"], "the training run's features, as a dataset"

    # The registered model page: its versions and the champion alias.
    name, version = registered_model.removeprefix("models:/").split("/")
    model = call(mlflow_server, f"registered-models/get?name={urllib.parse.quote(name)}")["registered_model"]
    assert {"alias": "champion", "version": version} in model["aliases"]
