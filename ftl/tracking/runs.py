"""Runs: the store and experiment, runs and their params, metrics, artifacts and dataset lineage."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from ftl.config import TrackingConfig
from ftl.errors import TrackingError, chain
from ftl.secrets import split_userinfo
from ftl.tracking.lookup import find_extraction
from ftl.tracking.owner import end_abandoned
from ftl.tracking.owner import tags as owner_tags
from ftl.tracking.reach import wait_for

DEFAULT_URI = "sqlite:///mlflow.db"
# MLflow 3's UI opens an experiment of this kind on its training runs, not on the GenAI views.
KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = {KIND_TAG: "custom_model_development"}


def uri_of(cfg: TrackingConfig) -> str:
    """The workflow's tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite file here; never with a password
    in it (see connect)."""
    return split_userinfo(cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)[0]


def connect(cfg: TrackingConfig) -> str:
    """Point MLflow at the store; returns its URI, bare.

    `https://user:password@host` becomes MLflow's own credentials (MLFLOW_TRACKING_USERNAME and
    _PASSWORD, in this process only) and the bare URI: MLflow prints its tracking URI in "View run
    at" lines, run links and errors, and a password inside it would land in logs.
    """
    # MLflow's artifact progress bar (tqdm, one redraw per file) would land between ftl's own progress lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    bare, user, password = split_userinfo(cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)
    if password is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user or ""
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    if os.environ.get("MLFLOW_TRACKING_URI") and split_userinfo(os.environ["MLFLOW_TRACKING_URI"])[2]:
        os.environ["MLFLOW_TRACKING_URI"] = bare  # read again by MLflow's own threads and subprocesses
    mlflow.set_tracking_uri(bare)
    return bare


def setup(cfg: TrackingConfig, workflow: str) -> str:
    """Point MLflow at the store and the workflow's experiment; returns the experiment id."""
    import mlflow

    wait_for(connect(cfg))
    if cfg.system_metrics:
        mlflow.set_system_metrics_sampling_interval(1)
        mlflow.set_system_metrics_samples_before_logging(1)
    name = cfg.experiment or workflow
    try:
        uri = uri_of(cfg)
        existing = mlflow.get_experiment_by_name(name)
        if existing is None:
            # Artifacts next to a SQLite file, not in ./mlruns of whatever directory we run in.
            folder = os.path.dirname(os.path.abspath(uri.removeprefix("sqlite:///")))
            location = Path(folder, "mlruns").as_uri() if uri.startswith("sqlite:///") else None
            mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        elif existing.tags.get(KIND_TAG) != EXPERIMENT_KIND[KIND_TAG]:
            mlflow.MlflowClient().set_experiment_tag(existing.experiment_id, KIND_TAG, EXPERIMENT_KIND[KIND_TAG])
        experiment_id = mlflow.set_experiment(name).experiment_id
        end_abandoned(experiment_id)
        return experiment_id
    except Exception as e:
        raise TrackingError(f"cannot use MLflow at {uri_of(cfg)}: {e}") from e


def unreachable(e: BaseException) -> bool:
    """Whether `e` came from MLflow or the way to it (its causes walked): the server down, a timeout, a refusal."""
    return any(isinstance(c, (TrackingError, ConnectionError))
               or (type(c).__module__ or "").startswith(("mlflow", "requests", "urllib3")) for c in chain(e))


def run_link(run_id: str) -> str:
    """The run's URL on a server, or how to open a local store with `mlflow ui`."""
    import mlflow

    run = mlflow.get_run(run_id)
    uri = mlflow.get_tracking_uri()
    # workflowType: MLflow 3's UI shows an experiment in its GenAI view unless told otherwise.
    path = f"#/experiments/{run.info.experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"mlflow ui --backend-store-uri {uri}  then open http://127.0.0.1:5000/{path}"


@contextlib.contextmanager
def start(cfg: TrackingConfig, *, name: str, stage: str, tags: dict | None = None) -> Iterator[str]:
    """A run with system metrics; yields its id."""
    import mlflow

    with mlflow.start_run(run_name=name, tags={"ftl.stage": stage, **owner_tags(), **(tags or {})},
                          log_system_metrics=cfg.system_metrics) as run:
        yield run.info.run_id


@contextlib.contextmanager
def logged_after(experiment_id: str, *, name: str, stage: str, tags: dict, began: float, ended: float
                 ) -> Iterator[str]:
    """A run of work already done (between the wall-clock times `began` and `ended`), logged now.

    Its start and end are the work's, so the runs table and a comparison by duration show how long the
    work took, not how long logging it did. No system metrics: they would sample the logging.
    """
    import mlflow

    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, start_time=int(began * 1000), run_name=name,
                            tags={"ftl.stage": stage, **owner_tags(), **tags})
    with mlflow.start_run(run_id=run.info.run_id, log_system_metrics=False):
        yield run.info.run_id
    client.set_terminated(run.info.run_id, "FINISHED", end_time=int(ended * 1000))


@contextlib.contextmanager
def child(*, name: str, stage: str, tags: dict | None = None) -> Iterator[str]:
    """A run nested under the active one (no system metrics: one sampler thread per trial costs more than it tells)."""
    import mlflow

    with mlflow.start_run(run_name=name, nested=True, tags={"ftl.stage": stage, **owner_tags(), **(tags or {})},
                          log_system_metrics=False) as run:
        yield run.info.run_id


@contextlib.contextmanager
def resume(cfg: TrackingConfig, run_id: str) -> Iterator[str]:
    """An earlier run, reopened: a resumed fine-tuning logs into the run it began."""
    import mlflow

    with mlflow.start_run(run_id=run_id, log_system_metrics=cfg.system_metrics) as run:
        mlflow.set_tags(owner_tags())  # this process runs it now
        yield run.info.run_id


def log_history_batch(history: list[dict]) -> None:
    """Per-epoch metrics with the epoch as the step, in one request per 1000 values (many runs log at once)."""
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, int(row["epoch"])) for row in history for k, v in row.items() if k != "epoch"]
    client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
    for i in range(0, len(values), 1000):
        client.log_batch(run_id, metrics=values[i : i + 1000], synchronous=True)


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def log_params(params: dict) -> None:
    import mlflow

    mlflow.log_params({k: v[:6000] for k, v in flatten(params).items()})


def log_metrics(metrics: dict, *, prefix: str = "", step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({prefix + k: float(v) for k, v in metrics.items()}, step=step)


def log_history(history: list[dict]) -> None:
    """Per-epoch metrics, with the epoch as the step."""
    for row in history:
        log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def log_text(text: str, path: str) -> None:
    import mlflow

    mlflow.log_text(text, path)


def log_file(path: str, folder: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(path, folder)


def feature_dataset(uri: str, *, name: str, digest: str, version: int | None = None):
    """A Delta table at a version (MLflow's own Delta source), or any other URI as MLflow resolves it."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.delta_dataset_source import DeltaDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    if version is not None:
        return MetaDataset(DeltaDatasetSource(path=uri, delta_table_version=version), name=name, digest=digest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": local paths match twice
        source = resolve_dataset_source(uri)
    return MetaDataset(source, name=name, digest=digest)


def log_dataset(uri: str, *, name: str, digest: str, context: str, tags: dict | None = None,
                version: int | None = None) -> None:
    """Lineage through mlflow.data: the feature table, its version and the digest of the feature set."""
    import mlflow

    mlflow.log_input(feature_dataset(uri, name=name, digest=digest, version=version), context=context,
                     tags={k: str(v) for k, v in (tags or {}).items()})


def log_extraction(cfg: TrackingConfig, *, workflow: str, result, params: dict) -> str:
    """An extraction run of its own: counts, quarantined, images/s, output URI; the feature set as output."""
    experiment = setup(cfg, workflow)
    prov = result.provenance
    if result.ok == 0 and result.quarantined == 0:  # nothing new: the earlier extraction run stands
        earlier = find_extraction(prov.feature_set, result.features_uri)
        if earlier:
            return earlier
    tags = {"ftl.feature_set": prov.feature_set, "ftl.features_uri": result.features_uri,
            "ftl.backbone": prov.backbone, "ftl.weights_sha256": prov.weights.sha256 or ""}
    with logged_after(experiment, name=f"extract-{prov.backbone}", stage="extract", tags=tags,
                      began=result.ended - result.seconds, ended=result.ended) as run_id:
        log_params({**params, "backbone": prov.backbone, "weights_sha256": prov.weights.sha256,
                    "layers": ",".join(prov.layer_names), "output": result.output,
                    **({"ran_on": result.settings} if result.settings else {})})
        # seconds: the extraction's wall time, as the user waited for it; images_per_second: its images over that.
        log_metrics({"listed": result.listed, "already_done": result.already_done, "extracted": result.ok,
                     "quarantined": result.quarantined, "images_per_second": result.images_per_second,
                     "seconds": result.seconds})
        log_text(json.dumps(prov.to_dict(), indent=2, sort_keys=True), "provenance.json")
        fv = result.versions.get("features")
        log_metrics({"features_version": fv} if fv is not None else {})
        log_dataset(result.features_uri, name=f"features-{prov.feature_set}", digest=prov.feature_set,
                    context="extracted", version=fv)
    return run_id


def set_tags(tags: dict) -> None:
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def temp_dir():
    return tempfile.TemporaryDirectory(prefix="ftl-model-")
