"""The actor that holds a frozen backbone and turns decoded batches into feature rows."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from ftl.io import schema
from ftl.model import backbones, imaging, weights
from ftl.pipeline import allocator, device_decode


@dataclass(frozen=True)
class ModelSpec:
    """Everything an actor needs to rebuild the tapped backbone on its own device."""

    backbone: str
    weights: weights.WeightsRef
    layers: tuple[str, ...]
    pooling: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    torch_threads: int | None = None
    storage_options: dict | None = None
    compile: bool = False
    batch_size: int = 64  # with compile, short batches are padded to it: one graph, no recompiles
    decode: str = "cpu"  # "device": batches carry JPEG bytes for device_decode
    preprocess: imaging.Preprocess | None = None  # needed by decode="device"
    max_image_pixels: int = 89_478_485


def pick_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("extract.device=cuda but this worker sees no GPU; use device=auto or cpu")
    return "cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu"


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """bf16 on GPUs by default; fp32 on CPU, where autocast costs more than it saves."""
    if precision == "auto":
        return torch.bfloat16 if device == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_tap(spec: ModelSpec, device: str) -> backbones.Tap:
    model = weights.load(spec.backbone, spec.weights, storage_options=spec.storage_options)
    # channels_last is faster on GPUs and at least as fast with oneDNN on CPUs.
    channels_last = True if spec.channels_last is None else spec.channels_last
    tap = backbones.Tap(model, list(spec.layers), pooling=spec.pooling, mean=spec.mean, std=spec.std,
                        channels_last=channels_last)
    tap = tap.to(device)
    tap = tap.to(memory_format=torch.channels_last) if channels_last else tap
    if spec.compile:
        # Static shapes: every call gets a full batch (see Embedder.features), so one graph serves all.
        tap.body = torch.compile(tap.body, dynamic=False)
    return tap


class Embedder:
    """Ray Data callable class: loads once in __init__, computes in __call__."""

    def __init__(self, spec: ModelSpec, prov: dict):
        self.device = pick_device(spec.device)
        allocator.reuse_freed_memory()
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus (often 1); on CPU the backbone
        # should use the cores, which decode tasks share (they are light next to the model).
        threads = spec.torch_threads or (len(os.sched_getaffinity(0)) if self.device == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        self.dtype = autocast_dtype(spec.precision, self.device)
        self.tap = build_tap(spec, self.device)
        self.pad_to = spec.batch_size if spec.compile else None
        self.decoder = (device_decode.DeviceDecoder(spec.preprocess, self.device, spec.max_image_pixels)
                        if spec.decode == "device" else None)
        self.schema = schema.features(prov)
        self.columns = [(l["name"], l["column"], l["dim"]) for l in prov["layers"]]
        self.np_dtype = np.float16 if prov["feature_dtype"] == "float16" else np.float32
        self.local = threading.local()  # a CUDA stream per thread when batches run concurrently

    def features(self, pixels: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """(N, H, W, 3) uint8, on the host or the device → {layer: (N, D)} on the host."""
        x = torch.from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels
        if x.device.type != self.device:
            x = device_decode.to_device(x, torch.device(self.device))
        n = len(x)
        if self.pad_to and n % self.pad_to:
            x = torch.cat([x, x.new_zeros((self.pad_to - n % self.pad_to, *x.shape[1:]))])
        autocast = (torch.autocast(self.device, dtype=self.dtype) if self.dtype else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            out = self.tap(x)
        return {k: v[:n].float().cpu().numpy() for k, v in out.items()}

    def stream(self):
        """This thread's CUDA stream, so that two concurrent batches overlap copies and compute."""
        if self.device != "cuda":
            return contextlib.nullcontext()
        if not hasattr(self.local, "stream"):
            self.local.stream = torch.cuda.Stream()
        return torch.cuda.stream(self.local.stream)

    def pixels(self, batch: dict[str, np.ndarray], ok: np.ndarray, stage: np.ndarray, error: np.ndarray):
        """The ok rows' pixels; rows the device decoder could not decode are marked in place."""
        if self.decoder is None:
            return batch["pixels"][ok]
        _, pixels, failed = self.decoder(batch, np.flatnonzero(ok))
        for row, reason in failed.items():
            ok[row], stage[row], error[row] = False, "decode", reason
        return pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = (batch["error"] == "") & (batch["stage"] != "done")
        stage, error = batch["stage"].copy(), batch["error"].copy()
        with self.stream():
            pixels = self.pixels(batch, ok, stage, error) if ok.any() else []
            feats = self.features(pixels) if len(pixels) else {}
        arrays = {
            "image_id": pa.array(batch["image_id"], pa.string()),
            "uri": pa.array(batch["uri"], pa.string()),
            "label": pa.array(batch["label"], pa.string()),
            "split": pa.array(batch["split"], pa.string()),
            "width": pa.array(batch["width"], pa.int32()),
            "height": pa.array(batch["height"], pa.int32()),
        }
        for layer, col, dim in self.columns:
            arrays[col] = fixed_size_list(feats.get(layer), ok, dim, self.np_dtype)
        arrays["stage"] = pa.array(stage, pa.string())
        arrays["error"] = pa.array(error, pa.string())  # "" for rows that made it
        return pa.table(arrays)


def fixed_size_list(values: np.ndarray | None, ok: np.ndarray, dim: int, dtype) -> pa.FixedSizeListArray:
    """(n_ok, D) values placed at the ok rows; quarantined rows are null."""
    full = np.zeros((len(ok), dim), dtype=dtype)
    if values is not None:
        full[ok] = values
    flat = pa.array(full.reshape(-1))
    mask = None if ok.all() else pa.array(~ok)
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)
