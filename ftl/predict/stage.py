"""Batch prediction: listed images → reader tasks → a pool of the registered model → Parquet.

The plan is extract's (ftl.pipeline.plan), tuned the same way (ftl.pipeline.tuning). Under
`predict.output`, `predictions/` holds each image's label, probability, top_labels and
top_probabilities (with its image_id and uri), and `quarantine/` the images that could not be
read or decoded, with the reason. Images in either folder are skipped: a rerun does only what is new.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa

from ftl import tracking
from ftl.config import PredictConfig, SourceConfig
from ftl.errors import SourceError, TrackingError
from ftl.io import incremental, storage
from ftl.io.sink import QUARANTINE, SplitSink
from ftl.pipeline import plan, tuning
from ftl.pipeline.runtime import ensure_ray
from ftl.predict.predictor import Predictor, output_schema
from ftl.sources import listing

PREDICTIONS = "predictions"


@dataclass
class PredictResult(plan.Tally):
    model: str
    output: str
    settings: str = ""  # the hardware-dependent choices of this run (ftl.pipeline.tuning)

    def summary(self) -> str:
        return (f"model {self.model}: {self.tally(ok_as='predicted')}\n"
                + (f"ran on {self.settings}\n" if self.settings else "")
                + f"predictions: {self.output}/{PREDICTIONS}\nquarantine:  {self.output}/{QUARANTINE}")


def load_model(cfg: PredictConfig, tracking_uri: str):
    """The model on the driver: it fails here, before any Ray work, and gives the preprocessing."""
    try:
        return tracking.load_classifier(cfg.model, tracking_uri=tracking_uri)
    except TrackingError as e:
        raise TrackingError(f"predict.model: {e}\nSet predict.model to models:/<name>/<version> of a model that "
                            f"`ftl train` registered at {tracking_uri} (tracking.uri), runs:/<run id>/model, "
                            f"or a model folder.") from e


def list_input(uri: str, storage_options: dict | None) -> pa.Table:
    """A folder of images, or a manifest by its suffix."""
    fmt = "manifest" if uri.endswith((".csv", ".parquet")) else "imagefolder"
    try:
        return listing.list_images(SourceConfig(uri=uri, format=fmt), storage_options=storage_options)
    except SourceError as e:
        # The listing speaks of a workflow's source; here the images come from predict.input.
        raise SourceError(str(e).replace("source.uri", "predict.input") + "; set predict.input to a folder of "
                          "images or a manifest .csv/.parquet") from None


def run(cfg: PredictConfig, *, tracking_uri: str, storage_options: dict | None = None) -> PredictResult:
    """Classify every listed image not yet in the output, with the model from the MLflow at `tracking_uri`."""
    started = time.perf_counter()
    model = load_model(cfg, tracking_uri)
    k = min(cfg.top_k, len(model.classes))
    out = storage.locate(cfg.output, storage_options)
    images = list_input(cfg.input, storage_options)
    todo = incremental.diff(images, out, (PREDICTIONS, QUARANTINE)).todo
    counts, settings = {"ok": 0, "quarantined": 0, "retry": 0}, ""
    if todo.num_rows:
        ensure_ray()
        tuned = tuning.resolve(cfg, tuning.Hardware.of_cluster(), crop=model.preprocess.crop)
        settings = tuned.describe()
        sink = SplitSink(out, folder=PREDICTIONS, schema=output_schema(k), rows_per_file=cfg.rows_per_file,
                         quarantine_from={"label": "true_label"})
        kwargs = {"model_uri": cfg.model, "tracking_uri": tracking_uri, "k": k, "runtime": tuned.runtime}
        ds = plan.build(plan.blocks(todo, rows=tuned.reader_batch_size), actor=Predictor, actor_kwargs=kwargs,
                        pre=model.preprocess, tuned=tuned, storage_options=storage_options)
        ds.write_datasink(sink)
        counts = sink.counts
    return PredictResult(model=cfg.model, listed=images.num_rows, already_done=images.num_rows - todo.num_rows,
                         ok=counts["ok"], quarantined=counts["quarantined"], retry=counts["retry"],
                         seconds=time.perf_counter() - started,
                         output=out.uri, settings=settings)
