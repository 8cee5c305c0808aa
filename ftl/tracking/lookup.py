"""Finding earlier runs: the extraction behind features, a training already done, probes to fine-tune from.

Filters quote what they compare, so a value holding a quote cannot break (or widen) the search."""

from __future__ import annotations

from ftl.errors import TrackingError


def find_extraction(feature_set: str, features_uri: str) -> str | None:
    """The latest extraction run that wrote this feature set to this place, if any."""
    import mlflow

    # Only the hex feature-set id goes into the filter; the URI (any characters, quotes included)
    # is compared here, so no value is ever spliced into MLflow's filter language.
    runs = mlflow.search_runs(
        filter_string=f"tags.`ftl.stage` = 'extract' and tags.`ftl.feature_set` = '{hex_id(feature_set)}'",
        order_by=["attributes.start_time DESC"], output_format="list",
    )
    return next((r.info.run_id for r in runs if r.data.tags.get("ftl.features_uri") == features_uri), None)


def hex_id(value: str) -> str:
    """An id ftl made (a hex digest): checked, because it goes into a search filter as it is."""
    if not value or any(c not in "0123456789abcdef" for c in value):
        raise TrackingError(f"{value!r} is not an id ftl made (hex digits); refusing to search MLflow with it")
    return value


def find_training(key: str):
    """A finished training run with this key (same features, train config and model name), if any."""
    import mlflow

    runs = mlflow.search_runs(
        filter_string=f"tags.`ftl.stage` = 'train' and tags.`ftl.train_key` = '{hex_id(key)}' and "
                      f"attributes.status = 'FINISHED' and tags.`ftl.model` != ''",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )
    return runs[0] if runs else None


def find_probes(feature_set: str) -> list[dict]:
    """Heads that `ftl train` or `ftl sweep` registered as image models for this feature set, best val first."""
    import mlflow

    client, out = mlflow.MlflowClient(), []
    runs = mlflow.search_runs(filter_string="attributes.status = 'FINISHED' and tags.`ftl.image_model` != ''",
                              order_by=["attributes.start_time DESC"], output_format="list")
    for run in runs:
        tags, stage = run.data.tags, run.data.tags.get("ftl.stage")
        if stage not in ("train", "sweep"):
            continue
        name, version = tags["ftl.image_model"].removeprefix("models:/").rsplit("/", 1)
        lineage = client.get_model_version(name, version).tags  # a sweep's run spans feature sets; its model does not
        if lineage.get("ftl.feature_set") == feature_set:
            out.append({"model": tags["ftl.image_model"], "run_id": run.info.run_id, "stage": stage,
                        "layer": lineage["ftl.layer"], "head": run.data.params.get(f"{stage}.head", ""),
                        # The score the version was registered with (a sweep's run holds many trials' scores).
                        "val_accuracy": float(lineage.get("ftl.val_accuracy",
                                                          run.data.metrics.get("val/accuracy", 0.0)))})
    return sorted(out, key=lambda p: -p["val_accuracy"])


def find_finetune(key: str):
    """The latest fine-tuning run with this key, finished or not (a killed one is resumed), if any."""
    import mlflow

    runs = mlflow.search_runs(filter_string=f"tags.`ftl.stage` = 'finetune' and "
                                            f"tags.`ftl.finetune_key` = '{hex_id(key)}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0] if runs else None
