"""Batch prediction: listed images → reader tasks → a pool of the registered model → a Delta table.

The plan is extract's (ftl.pipeline.plan), tuned the same way (ftl.pipeline.tuning). Under
`predict.output`, `predictions/` holds each image's label, probability, top_labels and
top_probabilities (with its image_id and uri), and `quarantine/` the images that could not be
read or decoded, with the reason, both Delta tables. Images in either are skipped: a rerun does only
what is new, and an image that changed has its old prediction removed before the new one lands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa

from ftl import tracking
from ftl.config import PredictConfig, SourceConfig, StorageConfig
from ftl.errors import FtlError, SourceError, TrackingError
from ftl.io import incremental, output, schema
from ftl.io.sink import QUARANTINE, SplitSink
from ftl.io.storage import locate
from ftl.pipeline import plan, tuning
from ftl.pipeline.progress import Progress
from ftl.pipeline.runtime import ensure_ray
from ftl.predict.predictor import Predictor, output_schema
from ftl.sources import listing
from ftl.tracking import champion

PREDICTIONS = "predictions"


@dataclass
class PredictResult(plan.Tally):
    model: str  # the version that ran (models:/name/3), whatever predict.model called it
    output: str
    settings: str = ""  # the hardware-dependent choices of this run (ftl.pipeline.tuning)
    duplicates: int = 0  # rows of a manifest naming an image already listed
    superseded: int = 0  # old predictions of images that changed since
    versions: dict = field(default_factory=dict)  # table folder → its version after this run
    asked: str = ""  # predict.model as given, when it named an alias, `latest` or a stage

    def summary(self) -> str:
        v = {k: f" (version {n})" if n is not None else "" for k, n in self.versions.items()}
        asked = f" ({self.asked})" if self.asked and self.asked != self.model else ""
        return (f"model {self.model}{asked}: {self.tally(ok_as='predicted')}\n"
                + (f"changed since last run: {self.superseded} (old predictions replaced)\n" if self.superseded else "")
                + (f"ran on {self.settings}\n" if self.settings else "")
                + f"predictions: {self.output}/{PREDICTIONS}{v.get(PREDICTIONS, '')}"
                + (f"\nquarantine:  {self.output}/{QUARANTINE}{v.get(QUARANTINE, '')}" if self.quarantined else ""))


def load_model(cfg: PredictConfig, tracking_uri: str):
    """The model on the driver, and the version it is: it fails here, before any Ray work, and gives the preprocessing.

    An alias, `latest` or a stage is pinned first, so what runs is the version the summary names even if
    the alias moves meanwhile.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)  # where the alias is looked up, as the loader looks it up
    try:
        version = champion.pin(cfg.model)
        return version, tracking.load_classifier(version)  # the tracking URI is set above
    except TrackingError as e:
        raise TrackingError(f"predict.model: {e}\nSet predict.model to models:/<name>/<version> of a model that "
                            f"`ftl train` registered at {tracking_uri} (tracking.uri), runs:/<run id>/model, "
                            f"or a model folder.") from e


def list_input(uri: str, storage_options: dict | None, *, check_only: bool = False) -> tuple[pa.Table, int] | None:
    """A folder of images, or a manifest by its suffix; and how many duplicate rows it dropped."""
    fmt = "manifest" if uri.endswith((".csv", ".parquet")) else "imagefolder"
    try:
        if check_only:
            return listing.check_exists(SourceConfig(uri=uri, format=fmt), storage_options=storage_options)
        return listing.list_unique(SourceConfig(uri=uri, format=fmt), storage_options=storage_options)
    except SourceError as e:
        # The listing speaks of a workflow's source; here the images come from predict.input.
        raise SourceError(str(e).replace("source.uri", "predict.input") + "; set predict.input to a folder of "
                          "images or a manifest .csv/.parquet") from None


def run(cfg: PredictConfig, *, tracking_uri: str, storage: StorageConfig = StorageConfig()) -> PredictResult:
    """Classify every listed image not yet in the output, with the model from the MLflow at `tracking_uri`."""
    started = time.perf_counter()
    version, model = load_model(cfg, tracking_uri)
    out = locate(cfg.output, storage.options)
    list_input(cfg.input, storage.options, check_only=True)  # a missing input fails before the output is touched
    identity = {"kind": "predictions", "model": model.identity, "model_uri": cfg.model, "model_version": version}
    k = min(cfg.top_k, len(model.classes))
    schemas = {PREDICTIONS: output_schema(k), QUARANTINE: schema.QUARANTINE}
    with output.writing(out, identity=identity, key="model", storage_cfg=storage, what="prediction",
                        mismatch=mismatch, schemas=schemas, description=identity) as held:
        listed = list_input(cfg.input, storage.options)
        counts = predict_into(out, cfg, model, listed, storage_options=storage.options, fence=held.fence)
        counts["versions"] = held.versions()
    return PredictResult(model=version, asked=cfg.model, **counts, seconds=time.perf_counter() - started,
                         output=out.uri)


def mismatch(existing: dict, identity: dict) -> FtlError:
    return FtlError(f"predict.output already holds predictions of another model ({existing.get('model_uri')}, "
                    f"model id {existing['model'][:12]}), not of {identity['model_uri']} (model id "
                    f"{identity['model'][:12]}); set predict.output to a new location for this model's predictions")


def predict_into(out, cfg: PredictConfig, model, listed: tuple[pa.Table, int], *, storage_options: dict | None,
                 fence) -> dict:
    """The work under the lease: diff, run the plan; returns the counts of the result."""
    images, duplicates = listed
    work = incremental.diff(images, out, (PREDICTIONS, QUARANTINE))
    incremental.supersede(out, work.superseded, fence=fence)
    todo = work.todo
    counts = {"listed": images.num_rows, "already_done": images.num_rows - todo.num_rows, "ok": 0,
              "quarantined": 0, "retry": 0, "duplicates": duplicates, "settings": "",
              "superseded": work.superseded_rows}
    if not todo.num_rows:
        return counts
    ensure_ray()
    import ray

    k = min(cfg.top_k, len(model.classes))
    tuned = tuning.settings_for(cfg, tuning.Hardware.of_cluster(), crop=model.preprocess.crop)
    sink = SplitSink(out, folder=PREDICTIONS, schema=output_schema(k), rows_per_file=cfg.rows_per_file,
                     quarantine_from={"label": "true_label"}, fence=fence)
    kwargs = {"files": ray.put(model.files()), "identity": model.identity, "k": k, "runtime": tuned.runtime}
    with Progress("predict", total=todo.num_rows) as progress:
        ds = plan.build(plan.blocks(todo, rows=tuned.reader_batch_size), actor=Predictor, actor_kwargs=kwargs,
                        pre=model.preprocess, tuned=tuned, storage_options=storage_options, progress=progress.handle)
        plan.write(ds, sink)
    done = sink.counts
    return counts | {"ok": done["ok"], "quarantined": done["quarantined"], "retry": done["retry"],
                     "settings": tuned.describe()}
