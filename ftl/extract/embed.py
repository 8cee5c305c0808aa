"""The actor that holds a frozen backbone and turns decoded batches into feature rows."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ftl.io import schema
from ftl.model import backbones, imaging, weights
from ftl.pipeline.runtime import ModelActor
from ftl.pipeline.tuning import Runtime


@dataclass(frozen=True)
class ModelSpec:
    """Which model an actor rebuilds: the backbone, its weights, the tapped layers and their input."""

    backbone: str
    weights: weights.WeightsRef
    layers: tuple[str, ...]
    pooling: str
    preprocess: imaging.Preprocess  # resize, crop, and the mean/std the Tap normalises with
    # The weights file's bytes in Ray's object store (an ObjectRef, see `ship`); None: read weights.uri.
    payload: Any = field(default=None, compare=False, repr=False)


def ship(spec: ModelSpec, *, storage_options: dict | None) -> ModelSpec:
    """The spec with its weights' bytes put once into Ray's object store, checked against their sha256.

    `weights.uri` is a path on the driver's machine (its torch hub cache, its site-packages, its
    disk), which an actor on another node does not have. The object store is on every node: each
    node pulls the bytes once, however many actors it holds, restarted actors get them again, and
    they go when the run drops the spec. A content-addressed copy next to the output would work
    too, but would leave a file per run behind and need its own write and cleanup. The bytes are
    read and hashed here, on the driver: a file that changed since `resolve` fails before any
    actor starts, and an actor loads exactly what the provenance records.
    """
    if spec.weights.kind == "random" or spec.payload is not None:
        return spec
    import ray

    return replace(spec, payload=ray.put(weights.read_bytes(spec.weights, storage_options=storage_options)))


def build_tap(spec: ModelSpec, *, channels_last: bool, storage_options: dict | None) -> backbones.Tap:
    """The tapped backbone on the host, from the shipped bytes if any; `runtime.place` puts it on its device."""
    data = None
    if spec.payload is not None:
        import ray

        data = ray.get(spec.payload)
    pre = spec.preprocess
    model = weights.load(spec.backbone, spec.weights, data=data, storage_options=storage_options, size=pre.crop)
    return backbones.tap(spec.backbone, model, list(spec.layers), pooling=spec.pooling, mean=pre.mean, std=pre.std,
                         channels_last=channels_last)


class Embedder(ModelActor):
    """Decoded batches → one fixed_size_list column per tapped layer; failed rows pass through empty."""

    def __init__(self, spec: ModelSpec, *, prov: schema.Provenance, runtime: Runtime, storage_options: dict | None = None,
                 progress=None):
        super().__init__(runtime, pre=spec.preprocess, progress=progress)
        self.tap = self.place(build_tap(spec, channels_last=runtime.channels_last, storage_options=storage_options))
        self.columns = [(l.name, l.column, l.dim) for l in prov.layers]
        self.np_dtype = np.float16 if prov.feature_dtype == "float16" else np.float32

    def forward(self, pixels: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """(N, H, W, 3) uint8, on the host or the device → {layer: (N, D)} on the host."""
        x, n = self.inputs(pixels)
        with torch.inference_mode(), self.autocast():
            out = self.tap(x)
        return {k: v[:n].float().cpu().numpy() for k, v in out.items()}

    def rows(self, batch: dict[str, np.ndarray], feats: dict[str, np.ndarray] | None, ok: np.ndarray,
             stage: np.ndarray, error: np.ndarray) -> pa.Table:
        arrays = {c: pa.array(batch[c], pa.string()) for c in schema.PASSTHROUGH}
        arrays |= {c: pa.array(batch[c], pa.int32()) for c in ("width", "height")}
        for layer, col, dim in self.columns:
            arrays[col] = fixed_size_list((feats or {}).get(layer), ok, dim, self.np_dtype)
        arrays["stage"] = pa.array(stage, pa.string())
        arrays["error"] = pa.array(error, pa.string())  # schema.ERROR_NONE for rows that made it
        return pa.table(arrays)


def fixed_size_list(values: np.ndarray | None, ok: np.ndarray, dim: int, dtype) -> pa.FixedSizeListArray:
    """(n_ok, D) values placed at the ok rows; quarantined rows are null."""
    full = np.zeros((len(ok), dim), dtype=dtype)
    if values is not None:
        full[ok] = values
    flat = pa.array(full.reshape(-1))
    mask = None if ok.all() else pa.array(~ok)
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)
