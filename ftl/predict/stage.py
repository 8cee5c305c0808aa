"""Batch prediction: images → decode tasks → actor pool holding the composed model → Parquet.

Output layout under `--output`:
    predictions/part-*.parquet  image_id, uri, label, probability, top_labels, top_probabilities
    quarantine/part-*.parquet   images that could not be read or decoded, with the reason
Images already in either folder are skipped, so a rerun does only what is new.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ftl import tracking
from ftl.config import SourceConfig, TrackingConfig
from ftl.io import incremental, storage
from ftl.io.sink import QUARANTINE, SplitSink
from ftl.pipeline import allocator, readers
from ftl.sources import listing

PREDICTIONS = "predictions"



def output_schema(k: int) -> pa.Schema:
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False), pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()), pa.field("probability", pa.float32()),
        pa.field("top_labels", pa.list_(pa.string(), k)), pa.field("top_probabilities", pa.list_(pa.float32(), k)),
    ])


@dataclass
class PredictResult:
    model: str
    listed: int
    already_done: int
    ok: int
    quarantined: int
    seconds: float
    output: str

    def summary(self) -> str:
        rate = (self.ok + self.quarantined) / self.seconds if self.seconds else 0.0
        return (f"model {self.model}: listed {self.listed} = {self.already_done} already done + {self.ok} predicted + "
                f"{self.quarantined} quarantined, in {self.seconds:.1f}s ({rate:.1f} images/s)\n"
                f"predictions: {self.output}/{PREDICTIONS}\nquarantine:  {self.output}/{QUARANTINE}")


class Predictor:
    """Ray Data callable class: loads the model once, classifies decoded batches."""

    def __init__(self, model_uri: str, tracking_uri: str, k: int):
        import torch

        self.model = tracking.load_classifier(model_uri, tracking_uri=tracking_uri)
        if self.model.device == "cpu":  # Ray caps threads at num_cpus; the model should use the cores
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        self.classes = np.array(self.model.classes, dtype=object)
        self.k = k

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = batch["error"] == ""
        n = len(ok)
        proba = np.zeros((n, len(self.classes)), np.float32)
        if ok.any():
            proba[ok] = self.model.probabilities(batch["pixels"][ok])
        top = np.argsort(-proba, axis=1, kind="stable")[:, : self.k]
        top_p = np.take_along_axis(proba, top, axis=1)
        mask = pa.array(~ok)
        return pa.table({
            "image_id": pa.array(batch["image_id"], pa.string()), "uri": pa.array(batch["uri"], pa.string()),
            "label": pa.array(self.classes[top[:, 0]], pa.string(), mask=~ok),
            "probability": pa.array(top_p[:, 0], pa.float32(), mask=~ok),
            "top_labels": pa.FixedSizeListArray.from_arrays(pa.array(self.classes[top].reshape(-1), pa.string()),
                                                            self.k, mask=mask),
            "top_probabilities": pa.FixedSizeListArray.from_arrays(pa.array(top_p.reshape(-1)), self.k, mask=mask),
            "true_label": pa.array(batch["label"], pa.string()), "split": pa.array(batch["split"], pa.string()),
            "stage": pa.array(batch["stage"], pa.string()), "error": pa.array(batch["error"], pa.string()),
        })


def list_input(uri: str, storage_options: dict | None) -> pa.Table:
    fmt = "manifest" if uri.endswith((".csv", ".parquet")) else "imagefolder"
    return listing.list_images(SourceConfig(uri=uri, format=fmt), storage_options=storage_options)


def run(model_uri: str, input_uri: str, output_uri: str, *, top_k: int = 5, batch_size: int = 64, actors: int = 1,
        storage_options: dict | None = None) -> PredictResult:
    """Classify every listed image not yet in the output."""
    import ray
    from ray.data import ActorPoolStrategy

    from ftl.pipeline.runtime import ensure_ray

    started = time.perf_counter()
    tracking_uri = tracking.uri_of(TrackingConfig())
    model = tracking.load_classifier(model_uri, tracking_uri=tracking_uri)  # fails early; gives the preprocessing
    k = min(top_k, len(model.classes))
    out = storage.locate(output_uri, storage_options)
    images = list_input(input_uri, storage_options)
    todo = incremental.diff(images, out, (PREDICTIONS, QUARANTINE)).todo
    result = PredictResult(model=model_uri, listed=images.num_rows, already_done=images.num_rows - todo.num_rows,
                           ok=0, quarantined=0, seconds=0.0, output=out.uri)
    if todo.num_rows:
        ensure_ray()
        ds = ray.data.from_arrow([todo.slice(i, batch_size) for i in range(0, todo.num_rows, batch_size)])
        # Half a CPU per decode task: unlike the actors' ask, so Ray does not fuse decoding into them.
        ds = ds.map_batches(readers.decode_batch, batch_size=batch_size, batch_format="pyarrow", num_cpus=0.5,
                            fn_kwargs={"pre": model.preprocess, "max_pixels": decode_limit(),
                                       "storage_options": storage_options})
        cpus = ray.cluster_resources().get("CPU", 1)
        ds = ds.map_batches(Predictor, fn_constructor_kwargs={"model_uri": model_uri, "k": k,
                                                              "tracking_uri": tracking_uri},
                            batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
                            num_cpus=max(0.5, min(1.0, cpus - 1)), runtime_env={"env_vars": allocator.ENV})
        sink = SplitSink(out, folder=PREDICTIONS, schema=output_schema(k), rows_per_file=8192,
                         quarantine_from={"label": "true_label"})
        ds.write_datasink(sink)
        result.ok, result.quarantined = sink.counts["ok"], sink.counts["quarantined"]
    result.seconds = time.perf_counter() - started
    return result


def decode_limit() -> int:
    from ftl.model.classifier import MAX_PIXELS

    return MAX_PIXELS
