"""The actor that holds a registered image model and turns decoded batches into prediction rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from ftl.model.classifier import ImageClassifier
from ftl.pipeline.runtime import ModelActor
from ftl.pipeline.tuning import Runtime


def output_schema(k: int) -> pa.Schema:
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False), pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()), pa.field("probability", pa.float32()),
        pa.field("top_labels", pa.list_(pa.string(), k)), pa.field("top_probabilities", pa.list_(pa.float32(), k)),
    ])


class Predictor(ModelActor):
    """Decoded batches → the top `k` classes and their probabilities; failed rows pass through empty."""

    def __init__(self, *, files, identity: str, k: int, runtime: Runtime, progress=None):
        import ray

        # The driver's model, through Ray's object store: an actor on any node gets the very bytes the
        # driver loaded, and never needs MLflow, its credentials, or the driver's disk.
        model = ImageClassifier.from_files(ray.get(files), identity=identity)
        super().__init__(runtime, pre=model.preprocess, progress=progress)
        # The model's own parts, on the device this actor picked, run with the pipeline's numerics.
        self.tap, self.layer = self.place(model.tap), model.layer
        self.head = model.head.to(self.device)
        self.classes = np.array(model.classes, dtype=object)
        self.k = k

    def forward(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, H, W, 3) uint8, on the host or the device → (N, classes) probabilities on the host."""
        x, n = self.inputs(pixels)
        with torch.inference_mode():
            with self.autocast():
                feats = self.tap(x)[self.layer]
            # The head and softmax in fp32 whatever the backbone ran in: probabilities to compare.
            return torch.softmax(self.head(feats[:n].float()), dim=1).cpu().numpy()

    def rows(self, batch: dict[str, np.ndarray], proba: np.ndarray | None, ok: np.ndarray, stage: np.ndarray,
             error: np.ndarray) -> pa.Table:
        full = np.zeros((len(ok), len(self.classes)), np.float32)
        if proba is not None:
            full[ok] = proba
        top = np.argsort(-full, axis=1, kind="stable")[:, : self.k]
        top_p = np.take_along_axis(full, top, axis=1)
        mask = pa.array(~ok)
        return pa.table({
            "image_id": pa.array(batch["image_id"], pa.string()), "uri": pa.array(batch["uri"], pa.string()),
            "label": pa.array(self.classes[top[:, 0]], pa.string(), mask=~ok),
            "probability": pa.array(top_p[:, 0], pa.float32(), mask=~ok),
            "top_labels": pa.FixedSizeListArray.from_arrays(pa.array(self.classes[top].reshape(-1), pa.string()),
                                                            self.k, mask=mask),
            "top_probabilities": pa.FixedSizeListArray.from_arrays(pa.array(top_p.reshape(-1)), self.k, mask=mask),
            # The listed label is kept for the quarantine table, which names it `label`.
            "true_label": pa.array(batch["label"], pa.string()), "split": pa.array(batch["split"], pa.string()),
            "stage": pa.array(stage, pa.string()), "error": pa.array(error, pa.string()),
        })
