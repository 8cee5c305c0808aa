"""Batch prediction: images → decode tasks → actor pool holding the composed model → Parquet.

Output layout under `--output`:
    predictions/part-*.parquet  image_id, uri, label, probability, top_labels, top_probabilities
    quarantine/part-*.parquet   images that could not be read or decoded, with the reason
Images already in either folder are skipped, so a rerun does only what is new.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink

from ftl import decode, schema, sources, storage, tracking
from ftl.config import SourceConfig, TrackingConfig

PREDICTIONS = "predictions"
QUARANTINE = "quarantine"


class PredictError(RuntimeError):
    """Prediction could not run as asked; the message says why."""


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


class PredictionSink(Datasink):
    """Each write task commits a predictions part and a quarantine part atomically."""

    def __init__(self, out: storage.Location, k: int):
        self.out, self.schema = out, output_schema(k)
        self.counts = {"ok": 0, "quarantined": 0}

    def write(self, blocks: Iterable, ctx) -> dict:
        tables = [b if isinstance(b, pa.Table) else pa.table(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"ok": 0, "quarantined": 0}
        table = pa.concat_tables(tables)
        bad = pc.not_equal(table["error"], "")
        good, quarantined = table.filter(pc.invert(bad)), table.filter(bad)
        name = f"part-{uuid.uuid4().hex}.parquet"
        if good.num_rows:
            storage.write_table_atomic(good.select(self.schema.names).cast(self.schema), self.out.join(PREDICTIONS), name)
        if quarantined.num_rows:
            q = pa.table({c: quarantined["true_label" if c == "label" else c] for c in schema.QUARANTINE.names})
            storage.write_table_atomic(q.cast(schema.QUARANTINE), self.out.join(QUARANTINE), name)
        return {"ok": good.num_rows, "quarantined": quarantined.num_rows}

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            for k in self.counts:
                self.counts[k] += r[k]


def list_input(uri: str, storage_options: dict | None) -> pa.Table:
    fmt = "manifest" if uri.endswith((".csv", ".parquet")) else "imagefolder"
    return sources.list_images(SourceConfig(uri=uri, format=fmt), storage_options=storage_options)


def done_ids(out: storage.Location) -> pa.Array:
    parts = [storage.read_parquet(out.join(d), columns=["image_id"]) for d in (PREDICTIONS, QUARANTINE)]
    parts = [p["image_id"].combine_chunks() for p in parts if p is not None]
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


def run(model_uri: str, input_uri: str, output_uri: str, *, top_k: int = 5, batch_size: int = 64, actors: int = 1,
        storage_options: dict | None = None) -> PredictResult:
    """Classify every listed image not yet in the output."""
    import ray
    from ray.data import ActorPoolStrategy

    from ftl.ray_runtime import ensure_ray

    started = time.perf_counter()
    tracking_uri = tracking.uri_of(TrackingConfig())
    model = tracking.load_classifier(model_uri, tracking_uri=tracking_uri)  # fails early; gives the preprocessing
    k = min(top_k, len(model.classes))
    out = storage.locate(output_uri, storage_options)
    listing = list_input(input_uri, storage_options)
    done = done_ids(out)
    todo = listing.filter(pc.invert(pc.is_in(listing["image_id"], value_set=done))) if len(done) else listing
    result = PredictResult(model=model_uri, listed=listing.num_rows, already_done=listing.num_rows - todo.num_rows,
                           ok=0, quarantined=0, seconds=0.0, output=out.uri)
    if todo.num_rows:
        ensure_ray()
        rows = batch_size * 4
        ds = ray.data.from_arrow([todo.slice(i, rows) for i in range(0, todo.num_rows, rows)])
        ds = ds.map_batches(decode.decode_batch, batch_size=batch_size, batch_format="pyarrow",
                            fn_kwargs={"pre": model.preprocess, "max_pixels": decode_limit(),
                                       "storage_options": storage_options})
        cpus = ray.cluster_resources().get("CPU", 1)
        ds = ds.map_batches(Predictor, fn_constructor_kwargs={"model_uri": model_uri, "k": k,
                                                              "tracking_uri": tracking_uri},
                            batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
                            num_cpus=max(0.5, min(1.0, cpus - 1)))
        sink = PredictionSink(out, k)
        ds.write_datasink(sink)
        result.ok, result.quarantined = sink.counts["ok"], sink.counts["quarantined"]
    result.seconds = time.perf_counter() - started
    return result


def decode_limit() -> int:
    from ftl.pyfunc import MAX_PIXELS

    return MAX_PIXELS
